"""Prints the commands of the README's "Quick start" section, one per line: the body of each ```bash block."""
import re
import sys


def quick_start_commands(text: str):
  section = re.search(r"^## Quick start.*?$(.*?)^## ", text, re.S | re.M)
  if section is None:
    raise SystemExit("README has no '## Quick start' section")
  blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
  # A block may continue lines with a backslash; each block is one command.
  return [" ".join(line.rstrip("\\").strip() for line in b.strip().splitlines()) for b in blocks]


if __name__ == "__main__":
  with open(sys.argv[1], encoding="utf-8") as f:
    for command in quick_start_commands(f.read()):
      print(command)
