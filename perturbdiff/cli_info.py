"""``perturbdiff info``: what this installation can run."""

import json
import platform

HELP = "Print the package, torch and Triton versions, the built backends and the thread count."


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict:
    import torch

    from . import __version__, extension_error, has_extension
    from .ops import available_backends

    build = {}
    if has_extension():
        build = json.loads(torch.ops.perturbdiff.build_info())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "perturbdiff": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": "built" if has_extension() else f"missing ({extension_error()})",
        "extension_build": build,
        "triton": triton_version,
        "backends": available_backends(),
        "threads": torch.get_num_threads(),
    }


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0
