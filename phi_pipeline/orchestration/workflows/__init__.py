"""Pure functions from (spec, target) to Olive workflow config dicts, one module per stage.

No I/O and no Olive import: each builder deep-copies a module-level TEMPLATE and sets overrides,
the way Olive's own `olive/cli/*.py` commands build their run configs.
"""
