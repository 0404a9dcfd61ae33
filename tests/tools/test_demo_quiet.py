"""The demo's output is its own: TensorFlow's start-up lines (CUDA probing, oneDNN and CPU
notices, absl's warning) do not appear among them."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from loader_server.tools.demo import TF_LOG_LINE
from tests.helpers import TF_STARTUP_NOISE, run_bounded

# What the demo does with TensorFlow, start to first step: import, build the model, run it (the
# first op initialises the devices, where TensorFlow probes CUDA). "loud" skips quiet_tensorflow.
TF_PART = textwrap.dedent("""
    import sys
    import numpy as np
    from loader_server.tools import demo
    if sys.argv[1] == "quiet":
        demo.quiet_tensorflow()
    demo.build_model().predict(np.zeros((2, 8, 8, 1), "float32"), verbose=0)
    print("the model ran", file=sys.stderr)
""")


def _run(mode: str) -> str:
    # the user's own settings for TensorFlow's log would decide the outcome, so none is inherited
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    result = run_bounded([sys.executable, "-c", TF_PART, mode], timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
def test_demo_tensorflow_start_prints_none_of_tensorflows_cpp_log_lines():
    loud = _run("loud")
    # without quiet_tensorflow TensorFlow does print C++ log records here, so the check below can fail
    assert any(TF_LOG_LINE.match(line) for line in loud.splitlines()), loud
    quiet = _run("quiet")
    assert "the model ran" in quiet
    assert not [line for line in quiet.splitlines() if TF_LOG_LINE.match(line)], quiet
    assert not [phrase for phrase in TF_STARTUP_NOISE if phrase in quiet], quiet
