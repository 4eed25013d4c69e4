"""python -m model_zoo {train, world, generate, generate-video, eval-needle, eval-loss, export, convert, plan}:
the command line."""

import argparse
import json
import os
import pathlib
import sys


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _number_list(kind):
    def parse(text):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def _stages(text):
    """'512:1e4:240,2048:1e5:60:4' -> [(seq_len, rope_theta, steps[, rows]), ...]."""
    stages = []
    for part in text.split(","):
        fields = part.split(":")
        try:
            if len(fields) not in (3, 4):
                raise ValueError
            stage = (int(fields[0]), float(fields[1]), int(fields[2]), *(int(f) for f in fields[3:]))
        except ValueError:
            raise argparse.ArgumentTypeError(f"a stage is SEQ_LEN:ROPE_THETA:STEPS[:ROWS], got {part!r}") from None
        stages.append(stage)
    return stages


def _mesh(text):
    """'dp=1,sp=8' -> (("dp", 1), ("sp", 8))."""
    from model_zoo.sharding import MESH_AXES

    axes = []
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(
                f"a mesh axis is NAME=SIZE with NAME in {', '.join(MESH_AXES)}; got {part!r}"
            )
        axes.append((name, int(size)))
    return tuple(axes)


# model_zoo.train.RECIPES' names and what they set, here so that --help needs no JAX.
RECIPES = ("retrieval",)
RECIPE_HELP = (
    "a named training recipe; 'retrieval': TINY to needle retrieval up to 2048 tokens (3200 steps of 16 x 256, "
    "then 600 of 4 x 2048 at rope_theta 1e5; half needle rows, half repeated passages; about an hour on 2 cores)"
)
TRAIN_DEFAULTS = dict(learning_rate=3e-3, needle_fraction=0.5, repeat_fraction=0.0, copy_fraction=0.0,
                      long_needle_fraction=0.0, save_every=50)
MODEL_HELP = (
    "a training workdir, a model folder (from convert), or the name of a model shipped in the package "
    "(lwm-tiny-retrieval)"
)
# ring_attn.context.STRATEGIES, named here so that --help needs no JAX.
STRATEGIES = ("auto", "ring", "all_gather", "ulysses", "usp")
STRATEGY_HELP = (
    "how attention spreads over the sequence (ring_attn.context_attention): ring (default), all_gather, "
    "ulysses, usp (Ulysses over the mesh's uly axis inside a ring over sp) or auto (the cost model's pick)"
)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m model_zoo", description=__doc__)
    parser.add_argument("--cpu-devices", type=_positive_int, default=8,
                        help="simulated devices when running on CPU (default 8: a ring of 8)")
    hosts = parser.add_argument_group("several processes (hosts): the same command on each, the mesh over all")
    hosts.add_argument("--coordinator", metavar="HOST:PORT",
                       help="the first process's address, with --num-processes and --process-id; 'auto': found by "
                            "jax.distributed on SLURM, Open MPI and TPU pods")
    hosts.add_argument("--num-processes", type=_positive_int)
    hosts.add_argument("--process-id", type=int)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume training) with progressive context")
    train.add_argument("--preset",
                       help="model preset (default: --init-from's model when it names one, else tiny)")
    train.add_argument("--workdir", required=True, type=pathlib.Path, help="checkpoints, metrics.jsonl, loss.png")
    train.add_argument("--steps", type=_positive_int, help="total steps, split over the stages in their proportions")
    train.add_argument("--stages", type=_stages,
                       help="SEQ_LEN:ROPE_THETA:STEPS[:ROWS],... (default: the preset's; ROWS: the stage's batch size)")
    train.add_argument("--recipe", choices=RECIPES, help=RECIPE_HELP)
    train.add_argument("--save-every", type=_positive_int, help="checkpoint period in steps (default 50)")
    train.add_argument("--keep", type=_positive_int, default=3, help="checkpoints kept")
    train.add_argument("--batch-size", type=_positive_int, help="rows per batch (default 8)")
    train.add_argument("--tokens-per-batch", type=_positive_int,
                       help="rows per batch of each stage = this // its length, the same tokens in every batch")
    train.add_argument("--learning-rate", type=float, help="peak learning rate (default 3e-3; the main job: 1e-3)")
    train.add_argument("--data", nargs="+", metavar="FILE",
                       help="train on these files or globs instead of the embedded corpus: JSON lines (.jsonl, "
                            ".jsonl.gz), Parquet, plain text (.txt, a file a document), ArrayRecord (JSON records) "
                            "or a Hugging Face dataset folder (save_to_disk); rows with 'messages' or 'prompt' + "
                            "'completion' are conversations, trained on the answers")
    train.add_argument("--data-field", default="text", help="the text field of --data's rows (default text)")
    train.add_argument("--tokenizer", type=pathlib.Path,
                       help="a SentencePiece .model or a Hugging Face tokenizer.json (default: --init-from's own, "
                            "else the shipped one)")
    train.add_argument("--needle-fraction", type=float,
                       help="share of rows that are retrieval examples (default 0.5; with --data 0, and their "
                            "haystacks are drawn from the data)")
    train.add_argument("--repeat-fraction", type=float, help="share of rows that are repeated passages (default 0)")
    train.add_argument("--copy-fraction", type=float,
                       help="share of rows that are random tokens followed by the same tokens (default 0)")
    train.add_argument("--long-needle-fraction", type=float,
                       help="share of the retrieval rows holding one row-long document, its needle drawn towards the "
                            "start, far from the question (default 0; the main job: 0.5)")
    train.add_argument("--max-needles", type=_positive_int, default=1,
                       help="needles per retrieval example, each asked for (default 1; more: 1..N drawn per example)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init-from",
                       help="start from the parameters of this workdir, model folder or shipped model (fresh optimizer "
                            "and schedule); 'none': from scratch. Default for tiny without --stages or --recipe: "
                            "lwm-tiny-retrieval, extended to 8192 tokens (4096 then 8192, rope_theta 3e5 then 1e6)")
    train.add_argument("--mesh", type=_mesh, default=(("sp", -1),),
                       help="axis sizes, e.g. dp=2,sp=4 or sp=2,uly=4 (default sp=all)")
    train.add_argument("--attention-strategy", choices=STRATEGIES, default="ring", help=STRATEGY_HELP)
    train.add_argument("--params-over-sequence", action="store_true",
                       help="shard parameters and optimizer state over the sequence and data axes too (ZeRO-3 over "
                            "every device), as `plan` assumes")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = commands.add_parser("generate", help="generate from a trained or converted model; with --video, answer "
                                               "about a clip")
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--prompt", help="the text to continue, or with --video the question")
    gen.add_argument("--video", type=pathlib.Path,
                     help="a clip or image (GIF, MP4, PNG, ...) for a vision model: its frames are encoded by the "
                          "model's VQGAN and placed before the question, as LWM's chat does")
    gen.add_argument("--max-frames", type=_positive_int, default=8,
                     help="frames of --video used, sampled evenly (default 8)")
    gen.add_argument("--batch", type=pathlib.Path, metavar="ROWS.jsonl",
                     help="one prompt a JSON line ('prompt', and 'video' for a vision model: a path relative to "
                          "the file), answered in one process; needs --out")
    gen.add_argument("--out", type=pathlib.Path, metavar="RESULTS.jsonl",
                     help="with --batch: each row with 'answer' added, a JSON line each")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the chat template (for chat models such as LWM-Text-Chat); by default "
                          "the model continues the prompt's text, which suits models trained here")
    gen.add_argument("--tokenizer", type=pathlib.Path,
                     help="a SentencePiece .model or tokenizer.json (default: the model's own, else the shipped one)")
    gen.add_argument("--mesh", type=_mesh, default=(("sp", -1),))
    gen.add_argument("--attention-strategy", choices=STRATEGIES, help="the prefill's attention (default: the model's)")

    video = commands.add_parser("generate-video", help="a clip from a caption (a vision model with its VQGAN)")
    video.add_argument("--model", required=True, help=MODEL_HELP.replace("lwm-tiny-retrieval", "lwm-tiny-vision"))
    video.add_argument("--prompt", help="the caption")
    video.add_argument("--frames", type=_positive_int, default=8, help="frames to generate (default 8)")
    video.add_argument("--out", required=True, type=pathlib.Path,
                       help="the clip (.gif, .mp4 or .png), or with --batch RESULTS.jsonl")
    video.add_argument("--batch", type=pathlib.Path, metavar="ROWS.jsonl",
                       help="one caption a JSON line ('prompt'); each clip is written beside --out and its row, with "
                            "'video' set to the clip's path, to --out")
    video.add_argument("--cfg-scale", type=float,
                       help="classifier-free guidance against LWM's unconditional <s><vision> (1: none; "
                            "default: model_zoo.vision_generate.DEFAULT_CFG_SCALE, the scale chosen for "
                            "lwm-tiny-vision)")
    video.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    video.add_argument("--top-k", type=_positive_int, help="sample from the k most likely codes (default: all)")
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--mesh", type=_mesh, default=(("sp", -1),))

    world_cmd = commands.add_parser(
        "world", help="train the tiny world end to end: its VQGAN, then TINY with vision on the ring, scored and "
                      "exported to WORKDIR/model (about 2 h 20 min on 2 cores, an hour with --rounds 1; a rerun "
                      "resumes)")
    world_cmd.add_argument("--workdir", required=True, type=pathlib.Path)
    world_cmd.add_argument("--steps", type=_positive_int, help="LWM training steps a round (default 3000)")
    world_cmd.add_argument("--rounds", type=_positive_int,
                           help="LWM training rounds, each on fresh clips from the one before (default 3)")
    world_cmd.add_argument("--vqgan-steps", type=_positive_int, help="VQGAN training steps (default 5000)")
    world_cmd.add_argument("--clips", type=_positive_int, help="training clips rendered a round (default 4000)")
    world_cmd.add_argument("--eval-clips", type=_positive_int, help="fresh clips the exported model is scored on "
                                                                    "(default 60)")
    world_cmd.add_argument("--no-progress", action="store_true")

    needle = commands.add_parser("eval-needle", help="needle-in-a-haystack retrieval grid")
    needle.add_argument("--model", "--workdir", dest="model", required=True, help=MODEL_HELP)
    needle.add_argument("--lengths", type=_number_list(int),
                        help="context lengths (default: 1/8, 1/4, 1/2, 3/4 and all of the model's positions)")
    needle.add_argument("--positions", type=_positive_int,
                        help="raise the model's positions to this many, with no training (to score a base model on "
                             "the grid of a longer one)")
    needle.add_argument("--depths", type=_number_list(float), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    needle.add_argument("--trials", type=_positive_int, default=4, help="haystacks per cell")
    needle.add_argument("--needles", type=_positive_int, default=1, help="needles hidden")
    needle.add_argument("--asked", type=_positive_int, default=1, help="needles asked for")
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--out", type=pathlib.Path,
                        help="where needle.json/png go (default: the model's folder; runs/NAME for a shipped model)")
    needle.add_argument("--mesh", type=_mesh, default=(("sp", -1),))

    loss = commands.add_parser("eval-loss", help="held-out documents' loss by token position (is the context used?)")
    loss.add_argument("--model", required=True, action="append",
                      help=MODEL_HELP + "; give --model several times to compare models on the same documents")
    loss.add_argument("--data", required=True, nargs="+", metavar="FILE",
                      help="held-out files or globs (as train --data)")
    loss.add_argument("--data-field", default="text")
    loss.add_argument("--seq-len", required=True, type=_positive_int, help="tokens scored per document, from its start")
    loss.add_argument("--documents", type=_positive_int, help="score at most this many documents, in file order")
    loss.add_argument("--min-tokens", type=_positive_int,
                      help="score documents of at least this many tokens (default --seq-len: every position bucket "
                           "then averages the same documents)")
    loss.add_argument("--batch-size", type=_positive_int, default=2, help="documents a forward pass")
    loss.add_argument("--out", type=pathlib.Path, required=True, help="where loss.json and loss.png go")
    loss.add_argument("--mesh", type=_mesh, default=(("sp", -1),))
    loss.add_argument("--no-progress", action="store_true")

    export = commands.add_parser("export", help="a trained workdir -> a self-contained model folder with provenance")
    export.add_argument("--workdir", required=True, type=pathlib.Path, help="a training workdir, eval-needle run on it")
    export.add_argument("--out", required=True, type=pathlib.Path)

    plan = commands.add_parser(
        "plan", help="compile the training step for GPUs or TPUs that are not here (the aot extra): memory per chip"
    )
    plan.add_argument("--preset", default="lwm-7b", help="a model preset (model_zoo.config.PRESETS)")
    length = plan.add_mutually_exclusive_group(required=True)
    length.add_argument("--seq-len", type=_positive_int, help="tokens in a training row")
    length.add_argument("--max-seq-len", action="store_true",
                        help="the longest power-of-two length from 32768 whose step fits")
    plan.add_argument("--topology", required=True,
                      help="'h100:8', 'a100:8', 'h200:8', 'b200:8' (GPUs on one host), 'h100:4x8' (hosts x GPUs), "
                           "'v4:2x2x2', 'v5p:4x4x4' (TPU chips, 3D torus), 'v5e:4x4', 'v6e:2x4' (TPU chips, 2D torus)")
    plan.add_argument("--mesh", type=_mesh, default=None,
                      help="e.g. 'sp=32,tp=2' (axes left out are 1; default: sp = every chip, parameters "
                           "and optimizer state sharded over it)")
    plan.add_argument("--batch-size", type=_positive_int, default=None, help="rows a step (default: dp*fsdp)")

    convert = commands.add_parser("convert", help="Hugging Face LLaMA folder -> model folder")
    convert.add_argument("hf_dir", type=pathlib.Path)
    convert.add_argument("out_dir", type=pathlib.Path)
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = argv
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):  # read when the CPU backend starts, so before any use
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={args.cpu_devices}".strip()
    try:
        if args.coordinator:
            _join_processes(args)
        commands = {"train": _train, "world": _world, "generate": _generate, "generate-video": _generate_video,
                    "eval-needle": _eval_needle, "eval-loss": _eval_loss, "export": _export, "convert": _convert,
                    "plan": _plan}
        commands[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _join_processes(args):
    import jax

    # CPU hosts need a transport for their collectives; accelerators bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator == "auto":
        jax.distributed.initialize()
        return
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id")
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must lie in [0, {args.num_processes}), got {args.process_id}")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _plan(args):
    import jax

    from model_zoo import plan
    from model_zoo.config import preset

    if jax.default_backend() != "cpu":
        raise RuntimeError("plan compiles for other chips from a CPU host: run it with JAX_PLATFORMS=cpu")
    model = preset(args.preset)
    mesh = None if args.mesh is None else {**{a: 1 for a in ("dp", "fsdp", "tp", "uly")}, "sp": 1, **dict(args.mesh)}
    if args.max_seq_len:
        longest, result = plan.max_seq_len(model, topology=args.topology, mesh_axes=mesh, batch_size=args.batch_size)
        if result is None:
            raise ValueError(f"not even 32,768 tokens of {args.preset} fit on {args.topology}")
        print(f"longest power-of-two context that fits: {longest:,} tokens")
    else:
        result = plan.plan(model, seq_len=args.seq_len, topology=args.topology, mesh_axes=mesh,
                           batch_size=args.batch_size)
    print(result.report())
    print("compiled by XLA for the target without the hardware; nothing ran")
    if not result.fits:
        raise ValueError(
            f"{args.seq_len:,} tokens of {args.preset} need {result.total_bytes / 2**30:.2f} GiB a chip, "
            f"{(result.total_bytes - result.chip_bytes) / 2**30:.2f} GiB more than {args.topology}'s "
            f"{result.chip_bytes / 2**30:.2f} GiB"
        )


def _train(args):
    argv = args.argv
    from model_zoo.config import preset
    from model_zoo.train import (
        MAIN_JOB,
        TINY_STAGES,
        Stage,
        TrainConfig,
        train,
        training_batches,
        training_mesh,
        training_tokenizer,
    )
    from model_zoo.train import RECIPES as RECIPE_SETTINGS

    model = preset(args.preset or "tiny")
    if args.preset is None and args.init_from not in (None, "none"):  # the model it starts from, as it is
        from model_zoo.checkpoint import read_config
        from model_zoo.shipped import resolve_model

        model = read_config(resolve_model(args.init_from))
    settings = dict(TRAIN_DEFAULTS, init_from=args.init_from)
    if args.data:
        settings["needle_fraction"] = 0.0  # the user's documents alone, unless retrieval rows are asked for
    if args.recipe:
        recipe = RECIPE_SETTINGS[args.recipe]
        given = [name for name in (*recipe, "steps") if getattr(args, name, None) is not None]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"--recipe {args.recipe} sets {flags}: drop {'it' if len(given) == 1 else 'them'}")
        settings.update(recipe)
    elif args.stages:
        settings["stages"] = tuple(Stage(*s) for s in args.stages)
    elif args.preset in (None, "tiny") and args.init_from is None:  # the main job: extend the shipped model's context
        settings.update(MAIN_JOB)
    elif args.preset in (None, "tiny"):
        settings["stages"] = TINY_STAGES
    else:
        raise ValueError(f"--stages is required for preset {args.preset!r} (only 'tiny' has default stages)")
    settings.update({k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None})
    stages, init_from = settings["stages"], settings["init_from"]
    if args.steps:
        stages = _scale_steps(stages, args.steps)
    given = {"--batch-size": args.batch_size, "--tokens-per-batch": args.tokens_per_batch}
    rows_flags = [flag for flag, value in given.items() if value is not None]
    if rows_flags and all(s.batch_size is not None for s in stages):
        raise ValueError(
            f"every stage of this run sets its own rows, so {rows_flags[0]} would change nothing: drop it, "
            "or give --stages SEQ_LEN:ROPE_THETA:STEPS without ROWS"
        )
    model = model.replace(max_position_embeddings=max(model.max_position_embeddings, max(s.seq_len for s in stages)),
                          attention_strategy=args.attention_strategy)
    cfg = TrainConfig(
        model=model, stages=stages, batch_size=args.batch_size or 8, tokens_per_batch=args.tokens_per_batch,
        learning_rate=settings["learning_rate"], needle_fraction=settings["needle_fraction"],
        repeat_fraction=settings["repeat_fraction"], copy_fraction=settings["copy_fraction"],
        long_needle_fraction=settings["long_needle_fraction"], max_needles=args.max_needles, seed=args.seed,
        save_every=settings["save_every"], keep_checkpoints=args.keep,
        mesh=args.mesh, params_over_sequence=args.params_over_sequence,
        init_from=None if init_from == "none" else init_from,
        data=tuple(args.data or ()), data_field=args.data_field,
        tokenizer=None if args.tokenizer is None else str(args.tokenizer),
    )
    mesh = training_mesh(cfg)  # refused here, before the workdir exists
    if cfg.init_from is not None:
        from model_zoo.shipped import resolve_model

        resolve_model(cfg.init_from)
    batches = training_batches(cfg, mesh, training_tokenizer(cfg))  # data and tokenizer checked, likewise
    import jax

    primary = jax.process_index() == 0  # with several processes, the first writes the run's files
    _check_same_run(args.workdir, cfg, write=primary)
    if primary:
        with open(args.workdir / "commands.log", "a") as log:  # every invocation, resumes included: the provenance
            log.write(" ".join(["python", "-m", "model_zoo", *(argv or sys.argv[1:])]) + "\n")
    train(cfg, args.workdir, progress=not args.no_progress, batches=batches)
    print(f"done: {cfg.total_steps} steps; metrics in {args.workdir / 'metrics.jsonl'}, "
          f"plot in {args.workdir / 'loss.png'}")


def _scale_steps(stages, total):
    import dataclasses

    if total < len(stages):
        raise ValueError(f"--steps {total} is fewer than the {len(stages)} stages")
    weights = [s.steps for s in stages]
    counts = [max(1, round(total * w / sum(weights))) for w in weights]
    counts[-1] = max(1, total - sum(counts[:-1]))
    return tuple(dataclasses.replace(s, steps=c) for s, c in zip(stages, counts))


def _check_same_run(workdir, cfg, write=True):
    """A workdir holds one run: resuming with different settings would mix two runs' checkpoints."""
    import dataclasses

    settings = json.loads(json.dumps(dataclasses.asdict(cfg)))
    path = workdir / "run.json"
    if path.exists():
        saved = json.loads(path.read_text())
        # A setting newer than the saved run counts as unchanged at its default (as JSON holds it).
        defaults = json.loads(json.dumps(
            {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING},
            default=dataclasses.asdict))
        changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k, defaults.get(k)))
        if changed:
            raise ValueError(f"{workdir} holds a run with different settings ({', '.join(changed)}); "
                             "use the same command to resume, or a new --workdir")
    elif write:
        workdir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(settings, indent=2) + "\n")
        partial.replace(path)  # whole or absent for the other processes that read it


def _load(model, mesh_axes):
    """(mesh, config, params) of `--model`: a path, or a shipped model's name."""
    from model_zoo.checkpoint import load_model
    from model_zoo.sharding import make_mesh
    from model_zoo.shipped import resolve_model

    mesh = make_mesh(**dict(mesh_axes))
    config, params = load_model(resolve_model(model), mesh=mesh)
    return mesh, config, params


def _tokenizer(path, model):
    """--tokenizer, else the model's own, else the shipped one."""
    from model_zoo.shipped import resolve_model
    from model_zoo.tokenizer import load_tokenizer, model_tokenizer

    return load_tokenizer(path) if path else model_tokenizer(resolve_model(model))


def _generate(args):

    from model_zoo.tokenizer import check_fits

    if (args.batch is None) == (args.prompt is None):
        raise ValueError("give --prompt, or --batch ROWS.jsonl with --out")
    if args.batch is not None and args.out is None:
        raise ValueError("--batch needs --out RESULTS.jsonl")
    tokenizer = _tokenizer(args.tokenizer, args.model)
    mesh, config, params = _load(args.model, args.mesh)
    if args.attention_strategy:
        config = config.replace(attention_strategy=args.attention_strategy)
    check_fits(tokenizer, config.vocab_size)
    _answer(args, mesh, config, params, tokenizer)


def _answer(args, mesh, config, params, tokenizer):
    """generate: the prompt's continuation (or with --video the answer about the clip) streamed, or with
    --batch one JSON line a row."""
    import jax

    from model_zoo.corpus import chat_prompt
    from model_zoo.generate import generate
    from model_zoo.vision_generate import answer_about_clips

    rows = _batch_rows(args.batch, "prompt") if args.batch else [{"prompt": args.prompt, "video": args.video}]
    vision_rows = [r for r in rows if r.get("video") is not None]
    vqgan = None
    if vision_rows:
        if not config.vision:
            raise ValueError(f"--model {args.model} has no vision (vision=False): it cannot take a video")
        vqgan = _model_vqgan(args.model)
    streaming = args.batch is None
    emitted = []

    def stream(step, tokens):
        if tokens[0] >= 0 and tokens[0] != tokenizer.eos_id:
            emitted.append(int(tokens[0]))
            text = tokenizer.decode(emitted)
            print(text[len(tokenizer.decode(emitted[:-1])):], end="", flush=True)

    answers = []
    with jax.set_mesh(mesh):
        for row in rows:  # one at a time: each clip's prompt has its own length
            if row.get("video") is not None:
                codes = _clip_codes(vqgan, row["video"], args.max_frames)
                answer = answer_about_clips(params, config, tokenizer, [codes], [row["prompt"]],
                                            max_new_tokens=args.max_new_tokens,
                                            on_tokens=stream if streaming else None)[0]
            else:
                text = chat_prompt(row["prompt"]) if args.chat else row["prompt"]
                out = generate(params, [[tokenizer.bos_id] + tokenizer.encode(text)], config=config,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, stop_tokens=(tokenizer.eos_id,),
                               on_tokens=stream if streaming else None)[0]
                answer = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
            answers.append(answer)
    if streaming:
        print()
        return
    _write_results(args.out, [dict(row, video=_relative(row.get("video"), args.out), answer=a) if "video" in row
                              else dict(row, answer=a) for row, a in zip(rows, answers)])
    print(f"wrote {len(rows)} answers to {args.out}")


def _batch_rows(path, required):
    """The JSON lines of --batch, each checked for `required`; 'video' paths made relative to the file's folder."""
    rows = []
    if not path.is_file():
        raise FileNotFoundError(f"--batch {path} does not exist")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(required), str):
            raise ValueError(f"{path}:{number}: expected a JSON object with a string {required!r}")
        if row.get("video") is not None:
            video = pathlib.Path(row["video"]).expanduser()
            row["video"] = video if video.is_absolute() else path.parent / video
        rows.append(row)
    if not rows:
        raise ValueError(f"--batch {path} holds no rows")
    return rows


def _relative(path, out):
    if path is None:
        return None
    try:
        return str(pathlib.Path(path).resolve().relative_to(out.resolve().parent))
    except ValueError:
        return str(path)


def _write_results(out, rows):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as results:
        for row in rows:
            results.write(json.dumps({k: str(v) if isinstance(v, pathlib.Path) else v for k, v in row.items()}) + "\n")


def _model_vqgan(model):
    """The VQGAN a vision model carries (its folder's vqgan/)."""
    from model_zoo.shipped import resolve_model
    from model_zoo.vqgan import VQGAN

    folder = resolve_model(model) / "vqgan"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {model} has no VQGAN ({folder} is missing): frames cannot become codes")
    return VQGAN.load(folder)


def _clip_codes(vqgan, path, max_frames):
    """A clip's codes [F, n]: its frames read, sampled evenly, fitted to the VQGAN and encoded."""
    from model_zoo.media import fit_frames, read_frames

    frames = read_frames(path, max_frames=max_frames)
    return vqgan.encode_frames(fit_frames(frames, vqgan.resolution))


def _generate_video(args):
    import jax

    from model_zoo.media import write_frames
    from model_zoo.vision_generate import DEFAULT_CFG_SCALE, clips_from_captions

    cfg_scale = DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    if (args.batch is None) == (args.prompt is None):
        raise ValueError("give --prompt CAPTION, or --batch ROWS.jsonl")
    rows = _batch_rows(args.batch, "prompt") if args.batch else [{"prompt": args.prompt}]
    if args.batch is None and args.out.suffix.lower() not in (".gif", ".mp4", ".png"):
        raise ValueError(f"--out {args.out}: expected a .gif, .mp4 or .png clip")
    if args.batch is not None and args.out.suffix != ".jsonl":
        raise ValueError(f"--out {args.out}: with --batch, a RESULTS.jsonl")
    tokenizer = _tokenizer(None, args.model)
    mesh, config, params = _load(args.model, args.mesh)
    if not config.vision:
        raise ValueError(f"--model {args.model} has no vision (vision=False): it cannot generate a clip")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    vqgan = _model_vqgan(args.model)
    with jax.set_mesh(mesh):
        codes = clips_from_captions(
            params, config, tokenizer, [r["prompt"] for r in rows], frames=args.frames,
            tokens_per_frame=vqgan.tokens_per_frame, num_codes=vqgan.num_codes, cfg_scale=cfg_scale,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed,
            on_frame=lambda f, _: print(f"frame {f + 1}/{args.frames}", flush=True))
    if args.batch is None:
        written = write_frames(args.out, vqgan.decode_codes(codes[0]))
        print(f"wrote {', '.join(map(str, written))}")
        return
    results = []
    for i, (row, clip) in enumerate(zip(rows, codes)):
        path = args.out.parent / f"{args.out.stem}-{i:04d}.gif"
        write_frames(path, vqgan.decode_codes(clip))
        results.append(dict(row, video=_relative(path, args.out)))
    _write_results(args.out, results)
    print(f"wrote {len(rows)} clips beside {args.out}")


def _world(args):
    import dataclasses

    from model_zoo.world_recipe import WorldRecipe, run_world_recipe

    overrides = {k: v for k, v in (("steps", args.steps), ("vqgan_steps", args.vqgan_steps), ("clips", args.clips),
                                   ("rounds", args.rounds), ("eval_clips", args.eval_clips)) if v is not None}
    recipe = dataclasses.replace(WorldRecipe(), **overrides)
    command = " ".join(["python", "-m", "model_zoo", *(args.argv or sys.argv[1:])])
    out = run_world_recipe(recipe, args.workdir, progress=not args.no_progress, command=command)
    print(f"done: the model is {out}; its scores are in {out / 'provenance.json'}")


def _eval_needle(args):
    import jax
    import numpy as np

    from model_zoo.needle import evaluate_needles, format_table, save_results

    if args.asked > args.needles:
        raise ValueError(f"--asked {args.asked} cannot exceed --needles {args.needles}")
    if any(not 0 <= d <= 1 for d in args.depths):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths}")
    mesh, config, params = _load(args.model, args.mesh)
    if args.positions:
        config = config.replace(max_position_embeddings=args.positions)
    positions = config.max_position_embeddings
    lengths = args.lengths or [positions // 8, positions // 4, positions // 2, 3 * positions // 4, positions]
    if max(lengths) > positions:
        raise ValueError(
            f"--lengths up to {max(lengths)} exceed the model's {positions} positions "
            "(--positions raises them, with no training)"
        )

    def report(length, depth, score, sample):
        print(f"context {length:>6}, depth {depth:.2f}: {score:.2f}   (first answer: {sample!r})", flush=True)

    with jax.set_mesh(mesh):
        scores = evaluate_needles(params, config, lengths=lengths, depths=args.depths, trials=args.trials,
                                  num_needles=args.needles, num_asked=args.asked, seed=args.seed, on_cell=report,
                                  tokenizer=_tokenizer(None, args.model))
    print(format_table(scores, lengths, args.depths))
    out = args.out or _needle_out(args.model)
    save_results(out, np.asarray(scores), lengths, args.depths, trials=args.trials,
                 num_needles=args.needles, num_asked=args.asked, positions_raised_to=args.positions)
    print(f"wrote {out / 'needle.json'} and {out / 'needle.png'}")


def _needle_out(model):
    """The default folder for eval-needle's results: the model's own, or runs/NAME for a shipped one."""
    from model_zoo.shipped import shipped_models

    path = pathlib.Path(model)
    return path if path.exists() or model not in shipped_models() else pathlib.Path("runs") / model


def _export(args):
    import jax

    from model_zoo.checkpoint import load_model
    from model_zoo.shipped import export_model
    from model_zoo.train import read_metrics

    workdir = args.workdir
    needle_path = workdir / "needle.json"
    if not needle_path.is_file():
        raise FileNotFoundError(f"{needle_path} is missing: run eval-needle --model {workdir} first")
    needle = json.loads(needle_path.read_text())
    metrics = read_metrics(workdir / "metrics.jsonl")
    config, params = load_model(workdir)
    provenance = {
        "commands": (workdir / "commands.log").read_text().splitlines(),
        "run": json.loads((workdir / "run.json").read_text()),
        "steps": len(metrics),
        "tokens": sum(r["tokens"] for r in metrics),
        "step_seconds": round(sum(r["seconds"] for r in metrics), 1),
        "needle_grid": {k: needle[k] for k in ("lengths", "depths", "trials", "num_needles", "num_asked", "scores")},
        "needle_accuracy": needle["accuracy"],
        "jax": jax.__version__,
    }
    export_model(args.out, config, params, provenance)
    from model_zoo.tokenizer import copy_tokenizer, folder_tokenizer

    if (tokenizer := folder_tokenizer(workdir)) is not None:
        copy_tokenizer(tokenizer, args.out)
    print(f"wrote {args.out}: {len(metrics)} steps, {provenance['tokens']:,} tokens, "
          f"needle accuracy {needle['accuracy']:.2f}")


def _eval_loss(args):
    import jax

    from model_zoo.documents import Documents
    from model_zoo.position_loss import evaluate_position_loss, format_table, save_results, scored_documents
    from model_zoo.tokenizer import check_fits

    documents = Documents(args.data, args.data_field)
    print(f"data: {documents.describe()}")
    results, scored = {}, {}
    for model in args.model:
        tokenizer = _tokenizer(None, model)
        mesh, config, params = _load(model, args.mesh)
        check_fits(tokenizer, config.vocab_size)
        if args.seq_len > config.max_position_embeddings:
            raise ValueError(f"--seq-len {args.seq_len} exceeds {model}'s {config.max_position_embeddings} positions")
        if tokenizer.path not in scored:  # models that share a tokenizer score the same tokens
            scored[tokenizer.path], short = scored_documents(documents, tokenizer, seq_len=args.seq_len,
                                                             min_tokens=args.min_tokens, max_documents=args.documents)
            print(f"scoring {len(scored[tokenizer.path])} documents ({short} shorter than "
                  f"{args.min_tokens or args.seq_len} tokens left out)")
        with jax.set_mesh(mesh):
            results[model] = evaluate_position_loss(
                params, config, scored[tokenizer.path], mesh=mesh, seq_len=args.seq_len,
                batch_size=args.batch_size, progress=not args.no_progress, desc=model,
            )
    print(format_table(results))
    if jax.process_index() == 0:
        save_results(args.out, results, seq_len=args.seq_len, data=[str(p) for p in documents.paths])
        print(f"wrote {args.out / 'loss.json'} and {args.out / 'loss.png'}")


def _convert(args):
    import jax.numpy as jnp

    from model_zoo.hf import convert_checkpoint

    config = convert_checkpoint(args.hf_dir, args.out_dir, dtype=getattr(jnp, args.dtype))
    print(f"wrote {args.out_dir}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"rope_theta {config.rope_theta:g}, {config.max_position_embeddings} positions")


if __name__ == "__main__":
    sys.exit(main())
