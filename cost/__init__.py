"""The cost model: formulas, hardware catalog and calibration fitting, Pareto search, planner (run time and report)
and cluster simulator. It prices the model math of ``strategies`` without importing it: the two share only the layout
vocabulary (``strategies.layout``) and model shapes (``strategies.shapes``).

What the engine and the Serve ingress call:
- ``check_devices(shape, p)``: the shard layout for p devices, or ValueError saying why p cannot split the model;
- ``get_hardware(name)``: a catalog entry, calibrated by its profile when ``dynpart calibrate`` wrote one;
- ``plan_prefill(shape, hardware, devices, tokens, available=None, cached=0)``: the strategy for a prefill (or a
  chunk of ``tokens`` new tokens after ``cached`` ones already in the KV cache), with the predicted time of every
  strategy;
- ``plan_step(shape, hardware, devices, new, cached, decoding)``: the same for an engine step whose prefill chunks
  share it with decode tokens (those run megatron: one pass with a megatron chunk, a second pass otherwise);
- ``decode_step_time(shape, hardware, devices, contexts)``: a megatron decode step's predicted time;
- ``cost.correction``: those predictions corrected by the steps an engine measured (learned online, persisted).
"""

from cost.hardware import CalibrationProfile, Hardware, HardwareError, get_hardware, load_catalog, save_profile
from cost.planner import PlanChoice, decode_step_time, plan_decode, plan_prefill, plan_step
from cost.report import PlanReport, plan
from cost.search import STRATEGIES, search
from strategies.layout import DeviceSplit, check_devices

__all__ = ["CalibrationProfile", "DeviceSplit", "Hardware", "HardwareError", "PlanChoice", "PlanReport", "STRATEGIES",
           "check_devices", "decode_step_time", "get_hardware", "load_catalog", "plan", "plan_decode", "plan_prefill",
           "plan_step", "save_profile", "search"]
