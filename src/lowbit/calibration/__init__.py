"""How data flows through a model for calibrated methods: capture block inputs, the sequential block loop.

    capture.py   CalibrationConfig, token windows, first-block inputs, running one block
    stats.py     per-input statistics methods ask for by name ("hessian", "act_sq_mean", ...)
    loop.py      the block-by-block loop (true-sequential groups, quantize, propagate)
"""
from lowbit.calibration.capture import CalibrationConfig, calibration_tokens, capture_block_inputs, run_block
from lowbit.calibration.loop import quantize_calibrated
from lowbit.calibration.stats import StatSet, make_stat, register_stat

__all__ = ["CalibrationConfig", "calibration_tokens", "capture_block_inputs", "run_block",
           "quantize_calibrated", "StatSet", "make_stat", "register_stat"]
