"""Device transfer: copy an artifact to a device (SSH, adb) and check it there.

``push.py`` holds the resumable, checked copy; ``ssh.py`` and ``adb.py`` are its transports;
``command.py`` is the ``phi-export push`` command around it.
"""
