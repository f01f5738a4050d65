"""The pytest front end: the plugin (entry point ``pytest11``) and the
module it collects the conformance machines from.

``plugin``      options (``--candidate``, ``--shared-db``), the default
                profile, failure files in the terminal summary
``selection``   the ``--candidate`` selection of the running session
``suite``       one ``TestConformance_<name>`` test case per candidate
"""
