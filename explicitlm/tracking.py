"""What a run shows and keeps: rank 0's metrics (`metrics.jsonl`, SwanLab, a plot) and the console.

The console follows the tools people know (HF Trainer, torchtune): one progress bar per epoch with
loss, learning rate, tokens/s and ETA, each message once, Ray's and the libraries' own chatter down
to the warnings that matter. Rank 0 sends its progress to the driver (`ProgressBoard`, a small
actor), which draws it: a worker's own terminal output reaches the driver only line by line,
prefixed, and once per rank.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from explicitlm.config import Config


class MetricsLogger:
    """Rank 0's metrics: metrics.jsonl always, SwanLab when enabled."""

    def __init__(self, cfg: Config, rank: int):
        self.rank = rank
        self.path = Path(cfg.training.output_dir) / "metrics.jsonl"
        self.swan = None
        self.run_dir = ""
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.logging.swanlab_mode != "disabled":
            import swanlab

            log_dir = Path(cfg.training.output_dir) / "swanlog"
            # SwanLab's banner would reach the driver once per line, prefixed; the driver prints one
            # line about the run instead. Its terminal capture would also wrap stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                self.swan = swanlab.init(
                    project=cfg.logging.project,
                    name=cfg.logging.run_name or None,
                    mode=cfg.logging.swanlab_mode,
                    log_dir=str(log_dir),
                    config=json.loads(json.dumps(asdict(cfg))),
                    reinit=True,
                    settings=swanlab.Settings(terminal={"proxy_type": "none"}),
                )
            runs = sorted(log_dir.glob("run-*"), key=lambda p: p.stat().st_mtime)
            self.run_dir = str(runs[-1]) if runs else str(log_dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.swan is not None:
            import swanlab

            swanlab.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.swan is not None:
            import swanlab

            with contextlib.redirect_stdout(io.StringIO()):
                swanlab.finish()


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Training loss and validation accuracy over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", label="val accuracy", color="tab:red")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---- the console


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_process() -> None:
    """Library chatter down to the warnings that matter, in this process: the driver, and every Ray
    worker of a job that `start_ray` began (its runtime env runs this first)."""
    # Ray Data's INFO lines (every dataset's start, plan and end) and its note that progress bars
    # are off; RAY_DATA_LOG_LEVEL is read when ray.data is imported, the level set here if it was.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data's progress bars: a worker's (a training worker reading its shard, a split
    # coordinator) reach the driver's output line by line with terminal escapes, and one redrawn
    # for a whole run fills a log file. Off here and in every worker; the driver draws its own.
    # The variable is read when ray.data is imported; a dataset carries its DataContext to the
    # workers that run it, so the driver's is set too.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if "ray.data" in sys.modules:
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray's own deprecations inside its actors (nothing a user of these programs can change).
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Ray Train's worker context logs every report of every rank at INFO, under a logger named by its
    # file (so RunConfig's LoggingConfig, which filters the "ray.train" loggers, misses it).
    ray_dir = os.path.dirname(getattr(sys.modules.get("ray"), "__file__", "") or "")
    if ray_dir:
        context = os.path.join(ray_dir, "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(context).setLevel(logging.WARNING)
    # transformers' "Loading weights" bar (per process, per load).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def joined_cluster() -> bool:
    """Whether Ray here is (or will be) a cluster joined through RAY_ADDRESS, as under `ray job submit`,
    where an autoscaler may add the nodes a task asks for; else one machine's Ray, which cannot."""
    return bool(os.environ.get("RAY_ADDRESS"))


def start_ray(**kwargs: Any) -> str:
    """ray.init with the console kept quiet; returns one line saying what it started or joined."""
    import ray

    quiet_process()
    if ray.is_initialized():
        return ""
    env = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    joining = joined_cluster()
    if not joining:  # one machine: nothing preempts it, and the watcher's start logs an error line
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    # A new local cluster turns token authentication on and says so at WARNING; it stays on.
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    drop = _DropMessage("Token authentication is enabled for this Ray cluster")
    auth.addFilter(drop)
    try:
        context = ray.init(
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env, "worker_process_setup_hook": "explicitlm.tracking.quiet_process"},
            **kwargs,
        )
    finally:
        auth.removeFilter(drop)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    where = f"joined the cluster at {context.address_info.get('address', '')}" if joining else "started a local cluster"
    dashboard = f", dashboard http://{context.dashboard_url}" if getattr(context, "dashboard_url", "") else ""
    return f"ray: {where} ({cpus} CPUs, {gpus} GPUs{dashboard})"


@contextlib.contextmanager
def question_bar(desc: str, total: int | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """A bar of questions scored, on a terminal only: yields the `progress(n, total)` callback of
    `evaluate_records` (None elsewhere). Without `total`, the callback's total is used."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=total, unit=" questions", dynamic_ncols=True)

    def tick(n: int, pass_total: int) -> None:
        if total is None:
            bar.total = pass_total
        bar.update(n)

    try:
        yield tick
    finally:
        bar.total = bar.n  # a pass may hold fewer questions than announced
        bar.refresh()
        bar.close()


def print_table(rows: list[tuple[str, str]], file: Any = None) -> None:
    """Two aligned columns: what, value."""
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=file or sys.stdout)


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Events from rank 0 (progress, notes, validation) until the driver takes them."""

        def __init__(self) -> None:
            self.events: list[tuple[str, Any]] = []

        def put(self, kind: str, data: Any) -> None:
            self.events.append((kind, data))

        def take(self) -> list[tuple[str, Any]]:
            events, self.events = self.events, []
            return events

    return ProgressBoard


def progress_board():
    """A ProgressBoard actor for one training run (the driver holds it; rank 0 writes to it)."""
    return _board_class().remote()


class TrainingConsole:
    """Draws rank 0's events: one tqdm bar per epoch on a terminal (plain lines every 30 s when
    stderr is a file, e.g. a Ray job's log), notes and each epoch's validation line once."""

    def __init__(self, out: Any = None, bar_file: Any = None):
        self.out = out or sys.stdout
        self.bar_file = bar_file or sys.stderr
        self.tty = hasattr(self.bar_file, "isatty") and self.bar_file.isatty()
        self.bar = None
        self.epoch: dict[str, Any] = {}
        self.last_line = 0.0

    def write(self, text: str) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def handle(self, kind: str, data: Any) -> None:
        if kind == "note":
            self.write(data)
        elif kind == "epoch":
            self._close_bar()
            self.epoch = dict(data)
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=data["steps"],
                    initial=data["done"],
                    desc=f"epoch {data['epoch'] + 1}/{data['epochs']}",
                    unit="step",
                    file=self.bar_file,
                    dynamic_ncols=True,
                    leave=True,
                )
        elif kind == "step":
            postfix = f"loss={data['loss']:.3f}, lr={data['lr']:.1e}, tok/s={data['tokens_per_s']:,.0f}"
            if self.bar is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
                self.bar.update(data["done"] - self.bar.n)
                if data["done"] >= self.epoch["steps"]:  # validation follows: the bar keeps the training time
                    self._close_bar()
            elif time.time() - self.last_line >= 30 or data["done"] == self.epoch.get("steps"):
                self.last_line = time.time()
                e = self.epoch
                print(
                    f"epoch {e.get('epoch', 0) + 1}/{e.get('epochs', 1)}: step {data['done']}/{e.get('steps', '?')}, "
                    f"{postfix.replace('=', ' ')}",
                    file=self.out,
                    flush=True,
                )
        elif kind == "validated":
            self._close_bar()
            self.write(validation_line(data))

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()

    @contextlib.contextmanager
    def follow(self, board: Any, every_s: float = 0.3) -> Iterator[None]:
        """Draw the board's events while the body (e.g. `trainer.fit()`) runs."""
        import ray

        stop = threading.Event()

        def drain() -> None:
            for kind, data in ray.get(board.take.remote()):
                with contextlib.suppress(Exception):  # a line that cannot be drawn must not end the run
                    self.handle(kind, data)

        def loop() -> None:
            while not stop.wait(every_s):
                with contextlib.suppress(Exception):
                    drain()

        thread = threading.Thread(target=loop, name="training-console", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                drain()
            self.close()


def validation_line(data: dict[str, Any]) -> str:
    m = data["metrics"]
    parts = [f"accuracy {m['val_accuracy']:.3f}"]
    if "val_recall@1" in m:
        parts.append(f"recall@1 {m['val_recall@1']:.3f}")
    parts += [f"memory read {m['val_memory_read']:.3f}", f"loss {m['val_loss']:.3f}"]
    return (
        f"epoch {data['epoch'] + 1}/{data['epochs']}: validation ({m['val_n']} questions, "
        f"{data['seconds']:.0f} s): " + ", ".join(parts)
    )


class TrainProgress:
    """Rank 0's side of the console: the loop says where it is; `sink` (the driver's board, or a
    TrainingConsole in this process) shows it. Other ranks and runs without a console pass None."""

    def __init__(self, sink: Callable[[str, Any], None] | None, min_interval_s: float = 0.25):
        self.sink = sink
        self.min_interval_s = min_interval_s
        self.last = 0.0
        self.t0 = time.time()
        self.tokens = 0
        self.loss_sum = 0.0
        self.steps = 0
        self.epoch: dict[str, Any] = {}

    @classmethod
    def for_rank(cls, rank: int, board: Any = None, under_ray: bool = False) -> TrainProgress:
        if rank != 0:
            return cls(None)
        if board is not None:
            return cls(lambda kind, data: board.put.remote(kind, data))
        return cls(None if under_ray else TrainingConsole().handle)

    def note(self, text: str) -> None:
        if self.sink is not None:
            self.sink("note", text)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.t0, self.tokens, self.loss_sum, self.steps = time.time(), 0, 0.0, 0
        self.epoch = {"epoch": epoch, "epochs": epochs, "steps": steps, "done": done}
        if self.sink is not None:
            self.sink("epoch", self.epoch)

    def step(self, done: int, loss: Any, lr: float, tokens: int, world: int) -> None:
        """One optimizer step: `done` steps of the epoch so far; `loss` (a float, or a tensor still on
        the device: it is read only when the line is shown) sums into the epoch's running mean."""
        self.tokens += tokens
        self.loss_sum += loss
        self.steps += 1
        now = time.time()
        if self.sink is None or (now - self.last < self.min_interval_s and done < self.epoch.get("steps", 0)):
            return
        self.last = now
        tokens_per_s = self.tokens * world / max(now - self.t0, 1e-9)
        self.sink(
            "step", {"done": done, "loss": float(self.loss_sum) / self.steps, "lr": lr, "tokens_per_s": tokens_per_s}
        )

    def validated(self, metrics: dict[str, Any], seconds: float) -> None:
        if self.sink is not None and "val_accuracy" in metrics:
            self.sink("validated", {**self.epoch, "metrics": metrics, "seconds": seconds})
