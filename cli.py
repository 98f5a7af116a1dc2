"""The `scan` command: a thin typer app that delegates to the packages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SCAN open-vocabulary semantic segmentation: PyTorch reference, export and runtime.",
)


# Options of every command that runs a bundle, defined once (docs/runtime.md says how the defaults are chosen).
BACKEND = typer.Option(None, help="With a bundle: openvino, onnxruntime or tensorrt (default: the fastest here: onnxruntime on a CUDA GPU, else openvino, else onnxruntime).")
PRECISION = typer.Option(None, help="With a bundle: fp32, bf16 (openvino, CPUs with native BF16), fp16 (GPU) or int8 (CPU; the bundle's int8 pieces). Default: bf16 for openvino where native, else fp32.")
THREADS = typer.Option(None, help="With a bundle: inference threads of OpenVINO or ONNX Runtime (default: all cores).")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _run(job) -> None:
    """Run `job()`, turning user errors (`runtime.errors.ScanError`) into one line and exit status 2.

    Anything else is a bug and keeps its traceback.
    """
    from runtime.errors import ScanError

    try:
        job()
    except ScanError as exc:
        _fail(str(exc).strip().replace("\n", " "))


@app.command()
def segment(
    images: List[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...)."),
    vocab: str = typer.Option(..., help="Comma-separated names, a .txt/.json file, or a preset (ade150, ade847, pc59, pc459, voc20, coco171)."),
    out: Path = typer.Option(..., help="Output folder."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our .safetensors checkpoint or an official SCAN.pth (with --config)."),
    config: Optional[str] = typer.Option(None, help="Official YAML, our JSON, or a preset (tiny, vitb, vitl); a preset alone runs random weights."),
    bundle: Optional[Path] = typer.Option(None, help="Run an exported bundle with the torch-free runtime instead of the PyTorch model."),
    server: Optional[str] = typer.Option(None, help="Send the images to a `scan serve` server instead: host:port (HTTP) or grpc://host:port; its bundle's settings apply."),
    backend: Optional[str] = BACKEND,
    precision: Optional[str] = PRECISION,
    threads: Optional[int] = THREADS,
    save_logits: bool = typer.Option(False, help="Also write <stem>.npz with sem_seg [K,H,W] and classes."),
    no_resize: bool = typer.Option(False, "--no-resize", help="Feed images at their own size (padding to /32 still applies)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    mask_thr: Optional[float] = typer.Option(None, help="Override the mask threshold of the region classifier."),
    ensemble_weight: Optional[float] = typer.Option(None, help="Override the CLIP ensemble weight."),
    replace_ratio: Optional[float] = typer.Option(None, help="Override the contextual-shift ratio."),
    shift_rule: Optional[str] = typer.Option(None, help="Contextual-shift selection: deterministic (default) or official (random)."),
    log_ensemble: Optional[bool] = typer.Option(None, "--log-ensemble/--no-log-ensemble", help="Force the log ensemble branch on or off."),
    benchmark_settings: bool = typer.Option(True, help="With a benchmark preset vocabulary, use the official per-benchmark settings."),
    seed: int = typer.Option(0, help="Seed for random weights and the official shift rule."),
) -> None:
    """Segment images with the PyTorch model (--checkpoint/--config) or an exported bundle (--bundle)."""

    options = dict(
        images=images, vocab=vocab, out=out, checkpoint=checkpoint, config=config, bundle=bundle, server=server,
        backend=backend, precision=precision, threads=threads, save_logits=save_logits,
        resize=not no_resize, device=device, mask_thr=mask_thr, ensemble_weight=ensemble_weight,
        replace_ratio=replace_ratio, shift_rule=shift_rule, log_ensemble=log_ensemble,
        benchmark_settings=benchmark_settings, seed=seed,
    )

    def job() -> None:
        from cli_jobs.segment import SegmentOptions, run_segment

        run_segment(SegmentOptions(**options))

    _run(job)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Output folder (steps whose results are there are reused)."),
    preset: str = typer.Option("tiny", help="Model preset to train."),
    seed: int = typer.Option(0, help="Seed of the data, the weights and the training."),
    train_iters: int = typer.Option(300, help="Training iterations of the tiny model."),
    images: int = typer.Option(48, help="Synthetic images (a quarter of them, at least one, form the val split)."),
    bundle: Optional[Path] = typer.Option(None, help="Skip training and export: evaluate, segment and bench this bundle."),
    runs: int = typer.Option(3, help="Timed rounds of the benchmark."),
) -> None:
    """The main job on the embedded default: synthetic data, train tiny, evaluate, export, run the torch-free runtime, bench."""

    def job() -> None:
        from cli_jobs.demo import run_demo

        run_demo(out, preset, seed, bundle=bundle, runs=runs, train_iters=train_iters, images=images)

    _run(job)


@app.command("export")
def export_bundle(
    out: Path = typer.Option(..., help="Bundle folder to write (replaced atomically if it is a bundle)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our .safetensors or an official SCAN.pth (with --config)."),
    config: Optional[str] = typer.Option(None, help="Official YAML, our JSON, or a preset."),
    preset: Optional[str] = typer.Option(None, help="Export a preset with seeded random weights (tiny, vitb, vitl)."),
    vocab: Optional[str] = typer.Option(None, help="Vocabulary whose text embeddings are cached in the bundle."),
    standard_vocabs: bool = typer.Option(False, help="Also cache the six benchmark vocabularies."),
    precision: str = typer.Option("fp32", help="fp32 pieces are always written; fp16 adds fp16 pieces (fp32 LayerNorm/softmax/LFM) for TensorRT, int8 adds pieces quantised by NNCF calibration (QDQ, for OpenVINO and ONNX Runtime on CPU), fp16,int8 both. --tensorrt builds from fp16 if present, else fp32 (never int8)."),
    calibration: Optional[str] = typer.Option(None, help="With int8: calibration images (a folder of images, or a dataset: its train split), up to 8 sampled evenly; default the export gate's 3 drawn scenes. See docs/performance.md."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Also build TensorRT engines (tensorrt on a GPU host, or tensorrt-rtx ahead of time)."),
    trt_backend: Optional[str] = typer.Option(None, help="tensorrt or tensorrt_rtx (default: the first importable)."),
    trt_height: str = typer.Option("320,640,1024", help="Engine profile min,opt,max image height (multiples of 32)."),
    trt_width: str = typer.Option("320,640,1024", help="Engine profile min,opt,max image width (multiples of 32)."),
    trt_classes: str = typer.Option("1,150,1024", help="Engine profile min,opt,max vocabulary size K."),
    trt_masks: str = typer.Option("1,32,100", help="Engine profile min,opt,max regions per CLIP-adapter call."),
    seed: int = typer.Option(0, help="Seed for random weights."),
    triton: Optional[Path] = typer.Option(None, help="Also write a Triton model repository here (`scan triton-repo` has every option)."),
    triton_backend: str = typer.Option("onnxruntime", help="With --triton: onnxruntime, openvino, tensorrt (the bundle's engines) or python."),
    triton_gpus: Optional[str] = typer.Option(None, help="With --triton: GPU instances on these devices (e.g. 0,1); default CPU."),
) -> None:
    """Export the model as a bundle of ONNX pieces with parity gates, tokenizer data and text caches."""

    def job() -> None:
        from cli_jobs.export import ExportOptions, run_export

        repository = None
        if triton is not None:  # checked before minutes of export
            from cli_jobs.triton_repo import parse_gpus
            from export.triton_repo import RepositoryOptions

            repository = RepositoryOptions(piece_backend=triton_backend, gpus=parse_gpus(triton_gpus), vocab=vocab)
            repository.validate()
        run_export(ExportOptions(
            out=out, checkpoint=checkpoint, config=config, preset=preset, vocab=vocab, standard_vocabs=standard_vocabs,
            seed=seed, precision=precision, calibration=calibration, tensorrt=tensorrt, trt_backend=trt_backend,
            trt_ranges=dict(height=trt_height, width=trt_width, classes=trt_classes, masks=trt_masks),
        ))
        if repository is not None:
            from cli_jobs.triton_repo import run_triton_repo

            run_triton_repo(out, triton, repository)

    _run(job)


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Official SCAN.pth (detectron2 format)."),
    config: str = typer.Option(..., help="Its official YAML, or a preset name."),
    out: Path = typer.Option(..., help="Output path (.safetensors; a .json config is written beside it)."),
) -> None:
    """Convert an official checkpoint into ours (safetensors + JSON config)."""

    def job() -> None:
        from cli_jobs.convert import run_convert

        run_convert(checkpoint, config, out)

    _run(job)


@app.command()
def fuse(
    checkpoint: Path = typer.Option(..., help="Segmentation checkpoint: our .safetensors or an official SCAN.pth (with --config)."),
    clip: Path = typer.Option(..., help="Finetuned CLIP: the official CS_CLIP.pt, our finetuning .safetensors, or a plain open_clip file."),
    out: Path = typer.Option(..., help="Fused checkpoint to write (.safetensors; a .json config is written beside it)."),
    config: Optional[str] = typer.Option(None, help="With an official .pth: its official YAML or a preset (tiny, vitb, vitl)."),
    ensemble_weight: Optional[float] = typer.Option(None, help="Store this CLIP ensemble weight (0..1, official 0.7) in the fused config."),
) -> None:
    """Put a finetuned CLIP into a segmentation checkpoint (the official replace_clip step, SPEC 3.5)."""
    options = dict(checkpoint=checkpoint, clip=clip, out=out, config=config, ensemble_weight=ensemble_weight)

    def job() -> None:
        from cli_jobs.fuse import run_fuse

        run_fuse(**options)

    _run(job)


@app.command()
def bench(
    backends: str = typer.Option("eager,onnxruntime", help="Comma-separated: eager, onnxruntime, onnxruntime-int8, openvino (bf16 where the CPU has it natively), openvino-fp32, openvino-int8, tensorrt, tensorrt-fp16, ... (backend[-precision])."),
    bundle: Optional[Path] = typer.Option(None, help="An exported bundle (eager is rebuilt from its config: --seed, or --checkpoint for real weights)."),
    preset: Optional[str] = typer.Option(None, help="A preset with seeded random weights, exported once into the user cache."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our .safetensors or an official SCAN.pth (with --config), exported once into the user cache."),
    config: Optional[str] = typer.Option(None, help="With --checkpoint: its official YAML, our JSON, or a preset."),
    image_size: Optional[str] = typer.Option(None, help="Generated scene size, S or HxW (default 640), fed without the official resize."),
    images: Optional[Path] = typer.Option(None, help="A folder of images to benchmark instead (sorted; the official resize applies)."),
    vocab: str = typer.Option("ade150", help="Comma-separated names, a .txt/.json file, or a preset (ade150, ade847, pc59, ...)."),
    runs: int = typer.Option(3, help="Timed rounds; in each, every image goes through every backend in turn."),
    warmup: int = typer.Option(1, help="Untimed warm-up calls per backend."),
    threads: Optional[int] = typer.Option(None, help="PyTorch, ONNX Runtime and OpenVINO threads (default: all cores)."),
    device: str = typer.Option("cpu", help="Device of the eager backend: cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Seed of random weights, generated scenes and the official shift rule."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full results (benchmarks/SCHEMA.md) to this JSON file."),
    markdown: Optional[Path] = typer.Option(None, help="Write the tables to this markdown file."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of the stages per backend (and <stem>_<sweep>.png per sweep)."),
    sweep_image_size: Optional[str] = typer.Option(None, help="Sweep image sizes, e.g. 320,640,960,1280 (S or HxW each)."),
    sweep_vocab: Optional[str] = typer.Option(None, help="Sweep vocabulary sizes (the first n ade847 names), e.g. 10,150,847."),
    sweep_proposals: Optional[str] = typer.Option(None, help="Sweep valid proposals through the region stage, e.g. 1,10,25,50,100."),
    sweep_batch: Optional[str] = typer.Option(None, help="Sweep images per call, e.g. 1,2,4."),
) -> None:
    """Time backends side by side in one process: end to end, per stage, memory, label agreement, text, sweeps."""

    options = dict(
        backends=backends, bundle=bundle, preset=preset, checkpoint=checkpoint, config=config, image_size=image_size,
        images=images, vocab=vocab, runs=runs, warmup=warmup, threads=threads, device=device, seed=seed, json=json_out,
        markdown=markdown, plot=plot, sweep_image_size=sweep_image_size, sweep_vocab=sweep_vocab,
        sweep_proposals=sweep_proposals, sweep_batch=sweep_batch,
    )

    def job() -> None:
        from cli_jobs.bench import BenchOptions, run_bench_job

        run_bench_job(BenchOptions(**options))

    _run(job)


data_app = typer.Typer(no_args_is_help=True, help="Datasets: make a synthetic one.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Folder to write (the generic layout: images/, annotations/, classes.json)."),
    images: int = typer.Option(64, help="Number of images, split 3:1 into train and val."),
    size: str = typer.Option("256x256", help="Image size, HxW or one number."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same files."),
) -> None:
    """Write a seeded synthetic segmentation dataset that --dataset accepts wherever a benchmark name is."""

    def job() -> None:
        from cli_jobs.train import run_synth

        run_synth(out, images, size, seed)

    _run(job)


@app.command()
def train(
    config: str = typer.Option(..., help="Model: a preset (tiny, vitb, vitl), an official YAML (its SOLVER/INPUT keys apply) or our JSON."),
    dataset: str = typer.Option(..., help="A benchmark name (coco171_train, ade150_val, ...) or a folder in the generic layout (scan data synth)."),
    out: Path = typer.Option(..., help="Run folder: checkpoints/, log.jsonl, model_final.safetensors."),
    data_root: Optional[str] = typer.Option(None, help="Root of the benchmark datasets (default: $DETECTRON2_DATASETS, else ./datasets)."),
    split: str = typer.Option("train", help="Split of a generic dataset."),
    init: Optional[Path] = typer.Option(None, help="Start from these weights: our .safetensors or an official .pth."),
    clip_weights: Optional[Path] = typer.Option(None, help="Local open_clip weights for both CLIP towers (nothing is downloaded)."),
    backbone_weights: Optional[Path] = typer.Option(None, help="Local ImageNet Swin .pth for the backbone (the official start: swin_base_patch4_window12_384_22k.pth)."),
    max_iter: Optional[int] = typer.Option(None, help="Iterations (solver.max_iter)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch over all processes (solver.ims_per_batch)."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (solver.base_lr)."),
    checkpoint_period: Optional[int] = typer.Option(None, help="Write a checkpoint every N iterations."),
    num_workers: Optional[int] = typer.Option(None, help="Data-loading worker processes per training process."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights, data order and augmentation."),
    set_: List[str] = typer.Option([], "--set", help="Override any recipe value: KEY=VALUE, e.g. loss.num_points=4096 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint, exactly."),
    device: str = typer.Option("auto", help="cpu, cuda or auto; under torchrun each process takes its local GPU."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."),
) -> None:
    """Train the segmentation model (SPEC 3): one process, or several under torchrun (DDP)."""
    options = dict(config=config, dataset=dataset, out=out, data_root=data_root, split=split, init=init,
                   clip_weights=clip_weights, backbone_weights=backbone_weights, max_iter=max_iter,
                   batch_size=batch_size, lr=lr,
                   checkpoint_period=checkpoint_period, num_workers=num_workers, seed=seed, settings=list(set_),
                   resume=resume, device=device, progress=progress)

    def job() -> None:
        from cli_jobs.train import TrainOptions, run_train

        run_train(TrainOptions(**options))

    _run(job)


@app.command("finetune-clip")
def finetune_clip(
    config: str = typer.Option(..., help="Model: a preset (tiny, vitb, vitl), an official YAML or our JSON (which CLIP, which recipe)."),
    dataset: str = typer.Option(..., help="Segmentation dataset: a benchmark name (coco171_train, ...) or a generic folder; its ground-truth masks are the training regions (unless --csv) and its validation split the zero-shot check."),
    out: Path = typer.Option(..., help="Run folder: checkpoints/, log.jsonl, clip_final.safetensors."),
    init: Optional[Path] = typer.Option(None, help="Start from the CLIP towers of this SCAN checkpoint (our .safetensors, or an official .pth with --config)."),
    clip_weights: Optional[Path] = typer.Option(None, help="Or start both towers from local open_clip weights (the official start: datacomp_xl_s13b_b90k)."),
    csv: Optional[Path] = typer.Option(None, help="Train on an ov-seg mask-caption CSV (tab-separated filepath/title) instead of the dataset's masks."),
    full_images: Optional[Path] = typer.Option(None, help="With --csv: folder of the full images (<stem>.jpg, stem = region name before the first '_')."),
    val_dataset: Optional[str] = typer.Option(None, help="Dataset of the zero-shot check (default: the validation split of --dataset)."),
    data_root: Optional[str] = typer.Option(None, help="Root of the benchmark datasets (default: $DETECTRON2_DATASETS, else ./datasets)."),
    split: str = typer.Option("train", help="Split of a generic dataset to train on."),
    max_steps: Optional[int] = typer.Option(None, help="Steps (solver.max_steps; default: solver.epochs epochs)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs over the regions (solver.epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch over all processes (solver.batch_size)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (solver.lr)."),
    seed: Optional[int] = typer.Option(None, help="Seed of crops, shift draws and data order."),
    set_: List[str] = typer.Option([], "--set", help="Override any recipe value: KEY=VALUE, e.g. activation=gelu (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint, exactly."),
    device: str = typer.Option("auto", help="cpu, cuda or auto; under torchrun each process takes its local GPU."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."),
) -> None:
    """Finetune the region CLIP with the contextual shift (SPEC 4): one process, or several under torchrun."""
    options = dict(config=config, dataset=dataset, out=out, init=init, clip_weights=clip_weights, csv=csv,
                   full_images=full_images, val_dataset=val_dataset, data_root=data_root, split=split,
                   max_steps=max_steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                   settings=list(set_), resume=resume, device=device, progress=progress)

    def job() -> None:
        from cli_jobs.finetune import FinetuneOptions, run_finetune

        run_finetune(FinetuneOptions(**options))

    _run(job)


@app.command("eval")
def evaluate_command(
    dataset: str = typer.Option(..., help="A benchmark name (ade150, ade847, pc59, pc459, voc20, or e.g. ade150_val) or a generic dataset folder."),
    checkpoint: Optional[Path] = typer.Option(None, help="Evaluate the PyTorch model: our .safetensors or an official SCAN.pth (with --config)."),
    config: Optional[str] = typer.Option(None, help="Official YAML, our JSON, or a preset (a preset alone runs random weights)."),
    bundle: Optional[Path] = typer.Option(None, help="Evaluate an exported bundle with the torch-free runtime instead."),
    backend: Optional[str] = BACKEND,
    precision: Optional[str] = PRECISION,
    threads: Optional[int] = THREADS,
    data_root: Optional[str] = typer.Option(None, help="Root of the benchmark datasets (default: $DETECTRON2_DATASETS, else ./datasets)."),
    split: str = typer.Option("val", help="Split of a generic dataset."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every metric, per-class IoU and the settings to this JSON file."),
    no_resize: bool = typer.Option(False, "--no-resize", help="Feed images at their own size instead of the test resize."),
    device: str = typer.Option("auto", help="Eager model device: cpu, cuda, cuda:N or auto."),
    mask_thr: Optional[float] = typer.Option(None, help="Override the mask threshold."),
    ensemble_weight: Optional[float] = typer.Option(None, help="Override the CLIP ensemble weight."),
    replace_ratio: Optional[float] = typer.Option(None, help="Override the contextual-shift ratio."),
    log_ensemble: Optional[bool] = typer.Option(None, "--log-ensemble/--no-log-ensemble", help="Force the log ensemble branch."),
    benchmark_settings: bool = typer.Option(True, help="Use the official per-benchmark settings (SPEC 5.3) on benchmarks."),
    seed: int = typer.Option(0, help="Seed for random weights and the official shift rule."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."),
) -> None:
    """Evaluate on a dataset: mIoU, fwIoU, mACC, pACC, per-class IoU, SG-IoU; one process or several under torchrun."""
    options = dict(dataset=dataset, checkpoint=checkpoint, config=config, bundle=bundle, backend=backend,
                   precision=precision, threads=threads, data_root=data_root, split=split, json=json_out,
                   resize=not no_resize, device=device, mask_thr=mask_thr, ensemble_weight=ensemble_weight,
                   replace_ratio=replace_ratio, log_ensemble=log_ensemble, benchmark_settings=benchmark_settings,
                   seed=seed, progress=progress)

    def job() -> None:
        from cli_jobs.evaluate import EvalOptions, run_eval

        run_eval(EvalOptions(**options))

    _run(job)


@app.command("triton-repo")
def triton_repo(
    bundle: Path = typer.Option(..., help="The bundle (scan export)."),
    out: Path = typer.Option(..., help="Repository folder to write (new, empty, or one this command wrote)."),
    backend: str = typer.Option("onnxruntime", help="Piece models on Triton's onnxruntime, openvino (CPU) or tensorrt backend (the bundle's engines), or python (the Python backend; --python-engine runs the graphs)."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or int8 pieces (the bundle's), or bf16 (openvino, or python with --python-engine openvino)."),
    python_engine: str = typer.Option("onnxruntime", help="With --backend python: onnxruntime or openvino runs each piece inside Triton's Python backend."),
    gpus: Optional[str] = typer.Option(None, help="KIND_GPU piece instances on these devices (e.g. 0,1); default KIND_CPU."),
    instances: int = typer.Option(1, help="Instances per GPU (or on the CPU) of each piece, and of the orchestrator."),
    max_batch_size: int = typer.Option(4, help="Largest dynamic batch of requests the orchestrator takes."),
    max_queue_delay_us: int = typer.Option(2000, help="How long Triton waits to fill a batch (microseconds)."),
    vocab: Optional[str] = typer.Option(None, help="Default vocabulary for requests that send no class names."),
    threads: int = typer.Option(0, help="Inference threads per piece instance (0: the engine's default)."),
    engines: Optional[str] = typer.Option(None, help="With --backend tensorrt: the bundle's engine folder to serve."),
    no_resize: bool = typer.Option(False, "--no-resize", help="Feed images at their own size instead of the bundle's test resize."),
    max_classes: int = typer.Option(1024, help="Refuse requests with more class names than this."),
    max_image_pixels: int = typer.Option(40_000_000, help="Refuse images with more pixels than this."),
) -> None:
    """Write a Triton model repository for a bundle: piece models joined by a Python (BLS) orchestrator."""

    def job() -> None:
        from cli_jobs.triton_repo import parse_gpus, run_triton_repo
        from export.triton_repo import RepositoryOptions
        from runtime.serve_requests import RequestLimits

        run_triton_repo(bundle, out, RepositoryOptions(
            piece_backend=backend, precision=precision, gpus=parse_gpus(gpus), instances=instances,
            max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us, vocab=vocab, resize=not no_resize,
            limits=RequestLimits(max_classes, max_image_pixels), threads=threads, engines=engines,
            python_engine=python_engine))

    _run(job)


@app.command()
def serve(
    bundle: Optional[Path] = typer.Option(None, help="The bundle to serve (scan export)."),
    repository: Optional[Path] = typer.Option(None, help="Instead: serve a model repository (scan triton-repo --backend python) on PyTriton's server binary."),
    backend: Optional[str] = BACKEND,
    precision: Optional[str] = PRECISION,
    vocab: Optional[str] = typer.Option(None, help="Default vocabulary for requests that send no class names."),
    http_port: int = typer.Option(8000, help="Triton's HTTP port."),
    grpc_port: int = typer.Option(8001, help="Triton's gRPC port."),
    metrics_port: int = typer.Option(8002, help="Triton's Prometheus metrics port."),
    instances: int = typer.Option(1, help="Model instances (each its own Segmenter), run concurrently."),
    max_batch_size: int = typer.Option(4, help="Largest dynamic batch Triton forms from concurrent requests."),
    max_queue_delay_us: int = typer.Option(2000, help="How long Triton waits to fill a batch (microseconds)."),
    threads: Optional[int] = THREADS,
    exit_timeout: int = typer.Option(30, help="On SIGINT/SIGTERM, seconds in-flight requests may take to finish."),
    no_resize: bool = typer.Option(False, "--no-resize", help="Feed images at their own size instead of the bundle's test resize."),
    max_classes: int = typer.Option(1024, help="Refuse requests with more class names than this."),
    max_image_pixels: int = typer.Option(40_000_000, help="Refuse images with more pixels than this."),
) -> None:
    """Serve a bundle behind NVIDIA Triton Inference Server (HTTP, gRPC, metrics, dynamic batching)."""

    def job() -> None:
        from runtime.errors import ScanError

        if (bundle is None) == (repository is None):
            raise ScanError("pass either --bundle (serve a bundle) or --repository (a model repository)")
        if repository is not None:
            from cli_jobs.triton_repo import run_serve_repository

            return run_serve_repository(repository, http_port, grpc_port, metrics_port, exit_timeout)
        from cli_jobs.serve import run_serve
        from runtime.serving import ServeConfig

        run_serve(ServeConfig(bundle=bundle, backend=backend, precision=precision, threads=threads, vocab=vocab,
                              resize=not no_resize,
                              http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                              instances=instances, max_batch_size=max_batch_size,
                              max_queue_delay_us=max_queue_delay_us, exit_timeout_s=exit_timeout,
                              max_classes=max_classes, max_image_pixels=max_image_pixels))

    _run(job)


@app.command()
def doctor(
    bundle: Optional[Path] = typer.Option(None, help="Also check this bundle: recorded parity, engines, and the TensorRT gate."),
    build: bool = typer.Option(False, "--build", help="With --bundle: build engines in memory, not only parse."),
) -> None:
    """Report versions, available backends and devices, and why a backend is unavailable."""
    from cli_jobs.doctor import bundle_report, environment_report

    def job() -> None:
        for line in environment_report():
            typer.echo(line)
        if bundle is not None:
            for line in bundle_report(bundle, build):
                typer.echo(line)

    _run(job)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
