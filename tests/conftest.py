import sys
from pathlib import Path

# test helper modules (oracles.py, ...) import by name
sys.path.insert(0, str(Path(__file__).parent))
