"""Helpers shared by the tests, a module a concept (pytest puts tests/ on sys.path):

* ``volumes``: volumes, files and their data (layouts, whole reads and writes, sinks);
* ``processes``: what a process holds and uses, and what a sandbox leaves behind;
* ``spies``: libvirt-python's and the OS's calls, recorded or replaced;
* ``faults``: daemons killed, frozen or cut off, and what an operation fails with;
* ``events``: a recorder for the event implementation's unit tests.
"""
