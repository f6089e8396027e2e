"""``discene-export``: ONNX export, op check and TensorRT engine build from the command line.

  discene-export onnx  --config lite [--checkpoint ckpt.pt] --out model.onnx [--simplify] [--fp16]
  discene-export check --onnx model.onnx [--strict-jetpack]
  discene-export trt   --onnx model.onnx --out model.engine [--fp16] [--workspace-mb 4096] [--timing-cache PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("discene-export")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="discene-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("onnx", help="export a model to ONNX (opset 17) with a JSON sidecar")
    o.add_argument("--config", help="named config (lite, paper_student, paper_teacher) or YAML path")
    o.add_argument("--checkpoint", help="checkpoint .pt (without it: random weights, with a warning)")
    o.add_argument("--out", required=True, help="output .onnx path")
    o.add_argument("--simplify", action="store_true", help="run onnxsim when installed")
    o.add_argument("--fp16", action="store_true", help="also write <out>.fp16.onnx for TensorRT strongly typed builds")
    o.add_argument("--sampling", choices=["grid_sample", "gather"], default="grid_sample",
                   help="feature sampling ops: grid_sample (TensorRT) or gather (faster in onnxruntime on the CPU)")
    o.add_argument("--no-parity", action="store_true", help="skip the onnxruntime-vs-torch parity run")

    c = sub.add_parser("check", help="list the ops of an ONNX model and flag what TensorRT cannot parse")
    c.add_argument("--onnx", required=True)
    c.add_argument("--strict-jetpack", action="store_true", help="also flag ops newer than TensorRT 10.3")

    t = sub.add_parser("trt", help="build a TensorRT engine (needs the tensorrt package and a GPU)")
    t.add_argument("--onnx", required=True)
    t.add_argument("--out", required=True, help="output .engine path")
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--workspace-mb", type=int, default=4096)
    t.add_argument("--timing-cache", help="timing cache file, read if present and written back")
    t.add_argument("--strongly-typed", choices=["auto", "yes", "no"], default="auto",
                   help="auto: strongly typed FP16 from TensorRT 10.12 on, builder FP16 flag before")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bars for the build's phases (TensorRT's progress monitor; minutes on a Jetson)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # each command imports what it runs: --help and check need only onnx, not torch
        if args.command == "onnx":
            from .onnx_export import export_onnx

            side = export_onnx(args.config, args.out, checkpoint=args.checkpoint, simplify=args.simplify,
                               fp16=args.fp16, parity=not args.no_parity, sampling=args.sampling)
            print(f"wrote {args.out} (+ .json): opset {side['opset']}, inputs "
                  f"{[i['name'] for i in side['inputs']]}, TensorRT-unsupported ops {side['trt_unsupported_ops']}")
            if "parity" in side:
                print("parity vs torch:", json.dumps({k: side["parity"][k] for k in
                                                      ("max_abs_diff", "label_agreement", "occupied_label_agreement")}))
            return 0
        if args.command == "check":
            from .op_check import check_model

            report = check_model(args.onnx, allow_newer=not args.strict_jetpack)
            print(report.summary())
            return 0 if report.ok else 1
        from models.checkpoint import check_output_file

        from .sidecar import sidecar_path
        from .trt_build import build_engine

        for path in (args.out, sidecar_path(args.out)):
            check_output_file(path, "--out" if path == args.out else "output", {"--onnx": args.onnx,
                                                                              "--timing-cache": args.timing_cache})
        strongly = {"auto": None, "yes": True, "no": False}[args.strongly_typed]
        side = build_engine(args.onnx, args.out, fp16=args.fp16, workspace_mb=args.workspace_mb,
                            timing_cache=args.timing_cache, strongly_typed=strongly, verbose=args.verbose,
                            progress=not args.no_progress)
        print(f"wrote {args.out} (+ .json): TensorRT {side['tensorrt_version']} on {side['gpu']['name']}, "
              f"{side['precision']}")
        return 0
    except KeyboardInterrupt:  # Ctrl-C: each file is written atomically (trt: all of them after the build)
        done = "nothing written" if args.command == "trt" else "no file is left partly written"
        print(f"discene-export {args.command}: interrupted (Ctrl-C); {done}", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, RuntimeError) as exc:  # OSError: a full disk, a read-only folder
        print(f"discene-export {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - e.g. protobuf's DecodeError for a file that is not ONNX
        if args.verbose:
            raise
        path = getattr(args, "onnx", None) or getattr(args, "checkpoint", None) or ""
        print(f"discene-export {args.command}: error: cannot read {path} ({type(exc).__name__}: {exc}); "
              "run with -v for the traceback", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
