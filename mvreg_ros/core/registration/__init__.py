"""Registration policy: where a registration starts (initialisers), the global stage that
widens the capture range, the acceptance test that decides whether a result may be used, and
the pipeline that chains them. Plain PyTorch: the ROS node, ``mvreg eval``, ``mvreg bench`` and
the other commands all call this one implementation."""
