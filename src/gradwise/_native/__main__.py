"""``python -m gradwise._native FOLDER``: the background build `gradwise._native.module()` starts (its output
goes to FOLDER/build.log), at the lowest priority: the training it runs beside comes first."""
import os
import sys
from pathlib import Path

from gradwise._native import build

if hasattr(os, "nice"):
    os.nice(19)
build(Path(sys.argv[1]), verbose=True)
