"""Call 7's probe (scratch, as run): PyTorch's default FP32 on CUDA (cuDNN convolutions in TF32, matmuls
IEEE), before the torch backend offered it as ``tf32_convolutions``: its frame-path rate
(bench_frame_path) and its agreement with IEEE (fp16_agreement --compare tf32), with the backend's
``tf32`` option narrowed to the convolutions.

    python3 issue10_call7_probe_conv_tf32.py bench|agreement ARGS...
"""
import contextlib
import sys

import torch

sys.path[:0] = [".", "benchmarks"]
from export.backends import torch_backend as tb  # noqa: E402

_orig = tb.TorchBackend._context


@contextlib.contextmanager
def _conv_only(self):
    with _orig(self):
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
        if not getattr(self, "_probe_said", False):
            print(f"[probe] cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} "
                  f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}", flush=True)
            self._probe_said = True
        yield


tb.TorchBackend._context = _conv_only
what, *rest = sys.argv[1:]
if what == "bench":
    import bench_frame_path

    sys.exit(bench_frame_path.main(rest))
import fp16_agreement  # noqa: E402

sys.exit(fp16_agreement.main(rest))
