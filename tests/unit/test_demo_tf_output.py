"""The demo's filter for what TensorFlow prints while its libraries load: it applies
TF_CPP_MIN_LOG_LEVEL to the records TensorFlow printed before reading it, and keeps the rest."""

from __future__ import annotations

from loader_server.tools.demo import _shown_tf_output

# As TensorFlow 2.21 prints them on a machine without a GPU, with a Python warning among them.
LOADING = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796058161.257996   14356 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors.\n"
    "I0000 00:00:1796058161.258307   14356 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.\n"
    "/venv/lib/python3.11/site-packages/somepkg/__init__.py:3: UserWarning: something the user should see\n"
    "E0000 00:00:1796058196.181689   14465 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
)


def test_level_3_keeps_only_what_is_not_tensorflows_cpp_log():
    assert _shown_tf_output(LOADING, 3) == (
        "/venv/lib/python3.11/site-packages/somepkg/__init__.py:3: UserWarning: something the user should see\n")


def test_level_2_keeps_errors():
    shown = _shown_tf_output(LOADING, 2)
    assert "cuInit" in shown and "UserWarning" in shown
    assert "cuda drivers" not in shown and "oneDNN" not in shown and "absl::InitializeLog" not in shown


def test_level_0_keeps_everything():
    assert _shown_tf_output(LOADING, 0) == LOADING
