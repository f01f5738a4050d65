"""The machines layer: Hypothesis state machines that drive a candidate
on the platform and the oracle with the same operations.

``sequential``   :class:`~conformance.machines.sequential.Stage2Machine`,
                 its rules, and :func:`~conformance.machines.sequential.machine_for`
``boot``         the VM, layout and warm start every program begins with
``steps``        the rule argument strategies and the step wrapper
``result``       :class:`~conformance.machines.result.RunResult`

Machines never write files or format reports: they publish each failure to
:data:`conformance.machines.steps.FAILURE_LISTENERS`, which the failures
layer fills (see ``docs/architecture.md``).
"""
