"""The failures layer: what happens after a program fails.

``state``      what the report shows of the machine at the failure (walks,
               TLBs, caches, observations)
``document``   the replay document: encoding, versions, settings, loading
``report``     :class:`~conformance.failures.report.Report` and its renderings
``files``      writing the replay file and the Markdown report (a machine
               failure listener)
``polish``     step deletion after Hypothesis's shrink
``replay``     re-running a replay file without Hypothesis
``explain``    what a property family checks (``stage2-conformance explain``)

It uses the machines and everything below; only the front ends (the
runner, the CLI, the pytest plugin) use it (see ``docs/architecture.md``).
"""
