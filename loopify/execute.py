"""``loopify run``: run an artifact (TVM) or a model file (PyTorch) with a chosen loop count."""

from __future__ import annotations

from pathlib import Path

import torch

from loopify.errors import LoopifyError
from loopify.io import atomic_path


def save_tensors(path: Path, tensors: tuple) -> None:
    import io

    buf = io.BytesIO()  # in memory first: torch's zip writer aborts the process on a full disk
    torch.save(tuple(t.detach().cpu() for t in tensors), buf)
    with atomic_path(path, need=buf.getbuffer().nbytes) as tmp:
        tmp.write_bytes(buf.getbuffer())


def _flat_from_file(path: Path, names: list[str]) -> list[torch.Tensor]:
    from loopify.capture import load_inputs

    args, kwargs = load_inputs(path)
    if kwargs:
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise LoopifyError(f"{path}: inputs lack {missing[0]!r} (the model takes {', '.join(names)})")
        return list(args) + [kwargs[n] for n in names[len(args):]]
    return list(args)


def run(model: str | Path, *, loops=None, inputs: str | Path | None = None, threads: int | None = None):
    """Returns (outputs, flat inputs used)."""
    model = Path(model)
    if threads:
        torch.set_num_threads(threads)
    if model.is_dir() and (model / "manifest.json").is_file():
        from loopify import runtime

        art = runtime.load(model, num_threads=threads)
        if isinstance(art, runtime.GenerationArtifact):
            raise LoopifyError(f"{model}: a generation artifact (prefill / decode entry points): run it with "
                               "`loopify generate`")
        names = [s["name"] for s in art.inputs]
        if inputs is None:
            stored = art.example_inputs()
            if stored is None:
                raise LoopifyError(f"{model}: this artifact stores no example inputs; pass --inputs FILE (write "
                                   "one with `loopify run MODEL.pt2 --save-inputs FILE`)")
            flat = [torch.from_numpy(a) for a in stored]
        else:
            flat = _flat_from_file(Path(inputs), names)
        return list(art(*flat, loops=loops)), flat
    from loopify.compile import is_converted

    if is_converted(model):
        from loopify.convert import load_converted

        module, captured, _ = load_converted(model, loops=loops)
    else:
        from loopify import capture

        captured = capture.load(model)
        module = captured.module()
        if loops is not None:
            raise LoopifyError(f"{model}: not a converted model; it has no loops to set")
    if inputs is not None:
        from loopify.capture import load_inputs

        args, kwargs = load_inputs(inputs)
        if not kwargs and captured.kwargs:  # a flat tuple as saved by --save-inputs
            names = list(captured.kwargs)
            kwargs = dict(zip(names, args[len(captured.args):]))
            args = args[:len(captured.args)]
        captured.args, captured.kwargs = tuple(args), dict(kwargs)
    out = forward(module, captured, model)
    from loopify.verify import flat_tensors

    return flat_tensors(out), captured.flat_inputs()


def forward(module, captured, where) -> object:
    """``module`` on ``captured``'s inputs, with index inputs checked first: against the ranges
    the program's gathers allow (see :mod:`loopify.bounds`) when there is a program, else by
    turning the eager gather's IndexError into one line."""
    from loopify.bounds import IndexRangeError, check_inputs, index_ranges
    from loopify.capture.captured import describe_inputs

    flat = captured.flat_inputs()
    names = [d["name"] for d in describe_inputs(captured.args, captured.kwargs)]
    if captured.program is not None:
        check_inputs(index_ranges(captured.program), flat, names, str(where))
    try:
        with torch.no_grad():
            return module(*captured.args, **captured.kwargs)
    except IndexError as e:
        ints = [f"{n} in [{int(t.min())}, {int(t.max())}]" for n, t in zip(names, flat)
                if isinstance(t, torch.Tensor) and t.numel() and not t.is_floating_point()]
        raise IndexRangeError(f"{where}: an index input is outside the table it indexes ({'; '.join(ints)}), e.g. a "
                              f"token id past the vocabulary ({str(e).splitlines()[0]})") from None
