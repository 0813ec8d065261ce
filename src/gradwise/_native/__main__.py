"""``python -m gradwise._native FOLDER``, or this file run by its path: the background build
`gradwise._native.module()` starts (its output goes to FOLDER/build.log), at the lowest priority: the training it
runs beside comes first."""
import importlib.util
import os
import sys
from pathlib import Path

if __package__:
    from gradwise._native import build
else:  # (by its path: the package beside this file, whichever gradwise the default sys.path would import)
    _spec = importlib.util.spec_from_file_location("_gradwise_native_build", Path(__file__).with_name("__init__.py"))
    _helper = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_helper)
    build = _helper.build

if hasattr(os, "nice"):
    os.nice(19)
build(Path(sys.argv[1]), verbose=True)
