"""Workstation side of phi-edge: a Phi checkpoint in, a device artifact folder out.

- ``export.py`` runs one export; ``checkpoint.py``, ``artifact.py``, ``plan.py``, ``sizing.py`` serve it;
- ``formats/`` holds one module or package per artifact format, registered in ``formats/__init__.py``;
- ``deploy/`` copies artifacts to devices (SSH, adb) and checks them there;
- ``verify.py``, ``evaluate.py``, ``reference.py`` measure an artifact against its source checkpoint;
- ``fixtures/`` builds the tiny checkpoints of the demo and the tests; ``cli.py`` is ``phi-export``.

Heavy dependencies (torch, transformers, the export tools) live only in this package and are
imported inside the functions that need them.
"""

from phi_edge.runtimes.offline import disable_telemetry as _disable_telemetry

_disable_telemetry()
