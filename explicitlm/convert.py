"""OMCQ -> SFT records on Ray Data, streaming and in bounded memory, with every bad row accounted for.

1. Cut (the driver, vectorised, while Ray starts): the input is cut into byte ranges of whole items,
   about 4 MB each, without parsing them. A JSON array is cut at its top-level commas, found by a
   byte scanner that tracks strings and nesting depth; JSONL at newlines. A file that ends
   mid-array keeps every complete item and reports the byte offset of the break.
2. Convert (Ray Data, parallel): `map_batches` on a pool of actors reads its ranges from the file.
   The actors run on the driver's node, the one node sure to have the input file; on a cluster the
   records then travel to wherever they are needed as Ray Data blocks, never as paths.
   A range of good rows is parsed by Arrow's JSON reader and checked and rendered by compute
   kernels, all rows at once; a range with a bad row (or anything unusual) goes item by item
   through `parse_target`, which names each bad row's reason. Both give the same records.
3. Write (the driver, in order): records to JSONL or Parquet, bad rows to the rejects file with
   position, reason and the raw text. Two runs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from explicitlm.omcq_cut import plan_chunks
from explicitlm.omcq_rows import SFT_SCHEMA, ChunkConverter


@dataclass
class ConvertSummary:
    items: int = 0
    converted: int = 0
    rejected: Counter = field(default_factory=Counter)
    truncated_at: int | None = None
    seconds: float = 0.0
    output: str = ""
    rejects: str = ""
    # Start-up: Ray's start (or connection) and the cut of the input, which overlap; the rate counts
    # the time after it (the actor pool's start, the conversion, the writes).
    startup_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "items_in": self.items,
            "converted": self.converted,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "truncated_at_byte": self.truncated_at,
            "seconds": round(self.seconds, 2),
            "startup_seconds": round(self.startup_seconds, 2),
            "rows_per_s": round(self.items / max(self.seconds - self.startup_seconds, 1e-9), 1),
            "output": self.output,
            "rejects": self.rejects,
        }


def convert(
    input_path: str | Path,
    output_path: str | Path,
    rejects_path: str | Path | None = None,
    max_samples: int = 0,
    fmt: str = "jsonl",
    progress: bool = True,
) -> ConvertSummary:
    """Convert an OMCQ file; see the module docstring. Needs a running (or startable) Ray."""
    import ray

    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--format must be jsonl or parquet, got {fmt}")
    t0 = time.time()
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rejects_path = Path(rejects_path) if rejects_path else output_path.with_name(output_path.stem + ".rejects.jsonl")
    summary = ConvertSummary(output=str(output_path), rejects=str(rejects_path))
    # The cut runs while Ray starts: both mostly wait (numpy passes, process start-up).
    with ThreadPoolExecutor(1) as pool:
        planned = pool.submit(plan_chunks, input_path, max_samples)
        from explicitlm.tracking import start_ray

        start_ray(log_to_driver=False, include_dashboard=False)  # a local run: no dashboard processes
        kind, chunks, truncated = planned.result()
    summary.startup_seconds = time.time() - t0
    if truncated is not None:
        summary.truncated_at = truncated.offset
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows keep input order
    ctx.enable_progress_bars = False  # Ray Data's bars are per operator; this one counts items
    bar = _items_bar(sum(c.count for c in chunks), progress)
    writer = _Writer(output_path, rejects_path, fmt)
    try:
        if chunks:
            node, cpus = _driver_node()
            ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks)).map_batches(
                ChunkConverter,
                fn_constructor_kwargs={"path": str(Path(input_path).resolve()), "kind": kind, "fmt": fmt},
                batch_format="pyarrow",
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=max(1, min(len(chunks), cpus))),
                label_selector=node,
                # A conversion takes seconds to run again; a restarted actor could not always get
                # its constructor arguments back (Ray logs that as an error line for every pool).
                max_restarts=0,
            )
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                before = summary.items
                writer.write(batch, summary)
                if bar is not None:
                    bar.update(summary.items - before)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.time() - t0
    return summary


def _driver_node() -> tuple[dict[str, str], int]:
    """A label selector that keeps tasks on this (the driver's) node, and that node's CPUs."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), 1)
    return {"ray.io/node-id": node_id}, int(cpus)


def _items_bar(total: int, enabled: bool):
    """The converter's one progress bar: input items written, on a terminal only."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="convert", unit=" items", unit_scale=True, dynamic_ncols=True)


class _Writer:
    """Chunks' records to JSONL/Parquet and rejects to JSONL, in arrival (= input) order; atomic."""

    def __init__(self, output: Path, rejects: Path, fmt: str):
        self.fmt, self.output, self.rejects = fmt, output, rejects
        self.tmp_out = output.with_name(f".{output.name}.tmp")
        self.tmp_rej = rejects.with_name(f".{rejects.name}.tmp")
        self.rej = open(self.tmp_rej, "wb")
        self.out = open(self.tmp_out, "wb") if fmt == "jsonl" else None
        self.pq_writer = None
        self.idx = 0

    def write(self, batch: pa.Table, summary: ConvertSummary) -> None:
        cols = batch.select(["good", "reasons", "items"]).to_pydict()
        # Payloads go to the file as Arrow buffers, without a copy into Python bytes.
        payloads, rejected = (
            [v.as_buffer() or b"" for chunk in batch.column(name).chunks for v in chunk]
            for name in ("payload", "rejects")
        )
        for payload, rejects, good, reasons, items in zip(
            payloads, rejected, cols["good"], cols["reasons"], cols["items"]
        ):
            summary.items += items
            self.rej.write(rejects)
            summary.rejected.update(json.loads(reasons))
            summary.converted += good
            if self.out is not None:
                self.out.write(payload)
            elif good:
                table = pa.ipc.open_stream(payload).read_all()  # pa.Buffer reads without a copy
                table = table.append_column("idx", pa.array(np.arange(self.idx, self.idx + good), pa.int64()))
                self.idx += good
                if self.pq_writer is None:
                    self.pq_writer = pq.ParquetWriter(self.tmp_out, SFT_SCHEMA)
                self.pq_writer.write_table(table)

    def close(self) -> None:
        self.rej.close()
        if self.out is not None:
            self.out.close()
        elif self.pq_writer is not None:
            self.pq_writer.close()
        else:
            pq.write_table(SFT_SCHEMA.empty_table(), self.tmp_out)
        os.replace(self.tmp_out, self.output)
        os.replace(self.tmp_rej, self.rejects)

    def discard(self) -> None:
        for fh in (self.rej, self.out):
            if fh is not None:
                fh.close()
        if self.pq_writer is not None:
            self.pq_writer.close()
        for p in (self.tmp_out, self.tmp_rej):
            p.unlink(missing_ok=True)
