"""The Hydra configs of cvt-train, cvt-eval and cvt-bench. Importing this package registers their schema
(cvt_train/config.py) in Hydra's ConfigStore, which `initialize_config_module("cvt_train.conf")` relies on."""

from .. import config as _config  # noqa: F401  (registers train_schema, eval_schema, bench_schema)
