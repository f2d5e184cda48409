"""Evaluation: benchmark readers, metrics, and evaluators run against any `api.Encoder`.

Entry points: `registry.build_evaluators(config.evals)` -> evaluators with `.run(encoder)`,
`registry.format_table(results)` for the console. See registry.py for the config fields.
"""
