"""Privacy by construction: secure aggregation (the coordinator sees only the sum) and DP-SGD
(each device's examples carry a stated (epsilon, delta)). Issue 17.

Device side (Python 3.8, torch + the standard library, plus the `cryptography` package imported
lazily and only when secure aggregation is on): `shamir`, `fixedpoint`, `primitives`,
`neighbours`, `secagg_messages`, `secagg_device`, `dpsgd`, `errors`.
Coordinator side: `secagg_coordinator` (same limits: it shares the device's primitives) and
`accountant` (Python 3.11, Google's `dp-accounting`; never shipped to a device).

The package imports nothing itself, so importing one module costs only that module.
"""
