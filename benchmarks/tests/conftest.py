import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the scripts import each other as top-level modules
