"""What a user sees of training: a progress bar and the report."""

from __future__ import annotations


class ConsoleProgress:
    """A tqdm progress bar with the loss per depth; evaluations and checkpoints as lines."""

    def __init__(self, file=None, disable: bool | None = None):
        import sys

        self.file = file or sys.stderr
        self.disable = (not self.file.isatty()) if disable is None else disable
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["event"]
        if kind == "start":
            self.bar = tqdm(total=event["steps"], initial=event["step"], desc="train", unit="step",
                            file=self.file, disable=self.disable, dynamic_ncols=True)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            post = {f"d{i + 1}": f"{v:.4f}" for i, v in enumerate(event["depths"])}
            post["loss"] = f"{event['loss']:.4f}"
            self.bar.set_postfix(post, refresh=False)
        elif kind == "eval":
            row = "  ".join(f"depth {k}: " + ", ".join(f"{m} {v:.4f}" for m, v in r.items() if m != "loss")
                            for k, r in event["eval"]["depths"].items())
            self._write(f"eval at step {event['step']}: {row}")
        elif kind == "checkpoint":
            self._write(f"checkpoint at step {event['step']}: {event['path']}")
        elif kind == "done" and self.bar is not None:
            self.bar.close()

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        if self.bar is not None and not self.disable:
            tqdm.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)


# ----------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """Fidelity per depth before and after training, for the terminal."""
    lines = [f"trained {report['steps']} steps ({report['stopped']}) in {report['seconds']:.0f} s, loss {report['loss']}"
             + (f" (beta {report['beta']})" if report.get("beta") else "") + f", objective {report['objective']}"]
    before, after = report.get("before"), report.get("after")
    if after:
        metric = report["objective"] if report["objective"] in ("kl", "ce") else "cosine"
        head = f"{'depth':<6} {metric + ' before':>14} {metric + ' after':>14}"
        lines.append(head)
        for k, row in after["depths"].items():
            b = before["depths"][k][metric] if before else float("nan")
            lines.append(f"{k:<6} {b:>14.4f} {row[metric]:>14.4f}")
        lines.append(f"monotonic over depth after training: {'yes' if after['monotonic'] else 'NO'}")
    else:
        lines.append("no held-out data: no evaluation")
    if report.get("router"):
        from loopify.nn.routing import format_depths

        rs = report["router"]["loops"]
        for loop, r in rs.items():
            th = r.get("thresholds")
            lines.append(f"router {r['kind']} on {loop}: " + (f"capacity {':'.join(f'{c:g}' for c in r['capacity'])}, "
                         f"calibrated thresholds {', '.join('none (all pass)' if t is None else f'{t:.3g}' for t in th)}"
                                            if th else "token-choice" + (
                             f", loss-free bias {', '.join(f'{b:+.3g}' for b in r['bias'])}"
                             if r.get("balance") == "bias" else "")))
        lines.append(format_depths({loop: r["depth"] for loop, r in rs.items()}) + " on the held-out examples")
    return "\n".join(lines)
