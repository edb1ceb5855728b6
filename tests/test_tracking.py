"""The training console: one bar per epoch on a terminal, plain lines in a log, each message once."""

import io
import sys

from explicitlm.tracking import TrainingConsole, TrainProgress, print_table

VAL = {"val_accuracy": 0.9, "val_loss": 1.2, "val_n": 10, "val_memory_read": 1.0, "val_recall@1": 0.8}


def _epoch(progress: TrainProgress, epoch: int, losses: list[float]) -> None:
    progress.epoch_start(epoch, 2, len(losses), 0)
    for i, loss in enumerate(losses, 1):
        progress.step(i, loss, 1e-3, tokens=100, world=2)
    progress.validated(dict(VAL), 2.0)


def test_log_file_gets_plain_lines_and_each_message_once(capsys):
    console = TrainingConsole(out=sys.stdout, bar_file=io.StringIO())  # not a terminal
    progress = TrainProgress(console.handle, min_interval_s=0)
    progress.note("sft: frozen 4.46M, trainable 2.89M")
    _epoch(progress, 0, [1.0, 2.0, 3.0])
    _epoch(progress, 1, [3.0, 1.0])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sft: frozen 4.46M, trainable 2.89M"
    # A line at an epoch's first step, then at most one per 30 s, and its last; the loss is the
    # epoch's running mean.
    assert out[1].startswith("epoch 1/2: step 1/3, loss 1.000, lr 1.0e-03, tok/s ")
    assert out[2].startswith("epoch 1/2: step 3/3, loss 2.000, lr 1.0e-03, tok/s ")
    assert (
        out[3]
        == "epoch 1/2: validation (10 questions, 2 s): accuracy 0.900, recall@1 0.800, memory read 1.000, loss 1.200"
    )
    assert out[4].startswith("epoch 2/2: step 2/2, loss 2.000")
    assert out[5].startswith("epoch 2/2: validation") and len(out) == 6


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_bar_per_epoch_with_loss_lr_and_throughput(capsys):
    bars = _Terminal()
    console = TrainingConsole(out=sys.stdout, bar_file=bars)
    progress = TrainProgress(console.handle, min_interval_s=0)
    _epoch(progress, 0, [1.0, 2.0, 3.0])
    _epoch(progress, 1, [3.0, 1.0])
    console.close()
    finals = [part.strip() for part in bars.getvalue().split("\n") if part.strip()]
    assert len(finals) == 2  # each epoch's bar stays, once
    last = [s.split("\r")[-1].strip() for s in finals]
    assert last[0].startswith("epoch 1/2: 100%") and "3/3" in last[0] and "loss=2.000, lr=1.0e-03, tok/s=" in last[0]
    assert last[1].startswith("epoch 2/2: 100%") and "2/2" in last[1]
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["epoch 1/2", "epoch 2/2"]  # the validation lines


def test_other_ranks_and_runs_without_a_console_say_nothing(capsys):
    for progress in (TrainProgress.for_rank(1), TrainProgress.for_rank(0, board=None, under_ray=True)):
        progress.note("hidden")
        _epoch(progress, 0, [1.0])
    assert capsys.readouterr().out == ""


def test_table_aligns_two_columns(capsys):
    print_table([("option accuracy", "0.977"), ("per relation", "capital 0.77")])
    assert capsys.readouterr().out.splitlines() == ["  option accuracy  0.977", "  per relation     capital 0.77"]
