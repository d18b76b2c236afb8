"""`cvt-eval` and the sweep summary end to end, on tiny generated data.

The top-1 that cvt-eval reports is checked against a count made here without any of cvt_train's data or evaluation
code: the test reads the pixels from the pickle it wrote, normalises them itself and takes the argmax.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import make_images, write_cifar10_python, write_image_folder
from hydra import compose, initialize_config_module

import cvt_train
from cvt_train.engine.trainer import train
from cvt_train.eval import load_model
from cvt_train.models.convert import to_format

REPO = Path(__file__).resolve().parents[1]
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # conf/data/cifar10.yaml
# cvt_cifar_tiny with a third block in the last stage: HF's CvT port cannot build a stage whose depth is not larger
# than its index (it indexes drop-path rates by the stage), so the HF test needs depth 3 in stage 2.
MODEL = ["model=cvt_cifar_tiny", "model.stages.2.depth=3"]
# trainer.device=cpu: bit-exact comparisons (resume, ranks, eval) hold on CPU; on CUDA, cuDNN's algorithm choice
# and atomic adds change the last bits (README, Reproducibility)
FAST = [
    *MODEL,
    "trainer.device=cpu",
    "trainer.progress=false",
    "data.num_workers=0",
    "data.batch_size=50",
    "optim.lr=2e-3",
    "sched.warmup_epochs=0",
    "trainer.precision=fp32",
]
N_TRAIN, N_TEST = 300, 100
_EVAL_SCRIPT = Path(sys.executable).with_name("cvt-eval")
EVAL = [str(_EVAL_SCRIPT)] if _EVAL_SCRIPT.is_file() else [sys.executable, "-m", "cvt_train.eval"]


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only cost time on a shared CPU
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def cvt_eval(args: list[str], tmp_path: Path, name: str = "eval") -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / name
    result = run([*EVAL, *args, "eval.progress=false", f"hydra.run.dir={out}"], cwd=tmp_path)
    report = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
    return result, report


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --- independent reference: pixels and labels straight from the files the test wrote


def read_cifar_pickle(path: Path, label_key: bytes = b"labels") -> tuple[torch.Tensor, torch.Tensor]:
    batch = pickle.loads(path.read_bytes())
    images = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8)).reshape(-1, 3, 32, 32)
    return images, torch.tensor(batch[label_key])


def cifar_train_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar_pickle(root / "cifar-10-batches-py" / f"data_batch_{i}") for i in range(1, 6)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.double() / 255.0
    return ((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).float()


@torch.no_grad()
def count_top1_top5(model, images: torch.Tensor, labels: torch.Tensor, mean, std) -> tuple[float, float]:
    logits = model(normalise(images, mean, std))
    logits = getattr(logits, "logits", logits)  # HF's output object
    top5 = logits.topk(5, dim=1).indices
    return (
        100.0 * (top5[:, 0] == labels).sum().item() / len(labels),
        100.0 * (top5 == labels[:, None]).any(1).sum().item() / len(labels),
    )


# --- fixtures: one trained checkpoint for the module


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar10"), n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cifar_root) -> Path:
    """2 epochs, fp32, EMA on: best.pt of a cvt_cifar_tiny-like model that is far above chance."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                "data=cifar10",
                f"data.root={cifar_root}",
                "trainer.epochs=2",
                "trainer.ema.enabled=true",
            ],
        )
    train(cfg, run_dir)
    assert (run_dir / "best.pt").is_file()
    return run_dir / "best.pt"


@pytest.fixture(scope="module")
def test_images(cifar_root) -> tuple[torch.Tensor, torch.Tensor]:
    return read_cifar_pickle(cifar_root / "cifar-10-batches-py" / "test_batch")


# --- our checkpoints


def test_top1_equals_an_independent_count(ckpt, test_images, tmp_path):
    result, report = cvt_eval([f"ckpt={ckpt}", "trainer.precision=fp32"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for key in (
        "top1",
        "top5",
        "loss",
        "images",
        "params",
        "gmacs",
        "images_per_s",
        "precision",
        "checkpoint",
        "split",
        "resolution",
        "mean",
        "std",
    ):
        assert key in report, key
    assert json.loads(result.stdout.strip().splitlines()[-1])["top1"] == report["top1"]  # printed too

    model = load_model(ckpt)
    images, labels = test_images
    top1, top5 = count_top1_top5(model, images, labels, CIFAR10_MEAN, CIFAR10_STD)
    assert report["top1"] == top1 and report["top5"] == top5
    assert top1 > 40.0  # the model learned something: chance is 10%
    assert report["images"] == N_TEST and report["split"] == "val" and report["resolution"] == 32
    assert report["precision"] == "fp32" and report["checkpoint"] == str(ckpt)
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["gmacs"] == pytest.approx(cvt_train.count_macs(model, (3, 32, 32)) / 1e9)
    assert report["mean"] == pytest.approx(CIFAR10_MEAN) and report["std"] == pytest.approx(CIFAR10_STD)
    assert report["images_per_s"] > 0 and 0 < report["loss"] < 2.3


def test_flip_tta_is_the_mean_of_image_and_mirror_logits(ckpt, test_images, tmp_path):
    result, report = cvt_eval([f"ckpt={ckpt}", "trainer.precision=fp32", "eval.tta=flip"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(ckpt)
    images, labels = test_images
    x = normalise(images, CIFAR10_MEAN, CIFAR10_STD)
    with torch.no_grad():
        mean_logits = (model(x) + model(x.flip(3))) / 2
    top5 = mean_logits.topk(5, dim=1).indices
    assert report["tta"] == "flip"
    assert report["tta_top1"] == 100.0 * (top5[:, 0] == labels).sum().item() / len(labels)
    assert report["tta_top5"] == 100.0 * (top5 == labels[:, None]).any(1).sum().item() / len(labels)
    assert report["tta_loss"] == pytest.approx(torch.nn.functional.cross_entropy(mean_logits, labels).item(), rel=1e-5)
    assert (report["top1"], report["top5"]) == count_top1_top5(model, images, labels, CIFAR10_MEAN, CIFAR10_STD)


@pytest.mark.parametrize(
    "split,extra,images",
    [
        ("test", ["data.val_split=0.2"], N_TEST),  # the test pickle, whatever training held out
        ("val", ["data.val_split=0.2"], N_TRAIN // 5),  # the held-out 20% of the training images
        ("train", [], N_TRAIN),  # every training image, eval transform
    ],
)
def test_splits(split, extra, images, ckpt, cifar_root, test_images, tmp_path):
    result, report = cvt_eval([f"ckpt={ckpt}", "trainer.precision=fp32", f"eval.split={split}", *extra], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["split"] == split and report["images"] == images
    if split in ("test", "train"):
        pixels, labels = test_images if split == "test" else cifar_train_images(cifar_root)
        top1, _ = count_top1_top5(load_model(ckpt), pixels, labels, CIFAR10_MEAN, CIFAR10_STD)
        assert report["top1"] == top1


def test_ema_weights(ckpt, test_images, tmp_path):
    result, report = cvt_eval([f"ckpt={ckpt}", "trainer.precision=fp32", "eval.ema=true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stored = torch.load(ckpt, weights_only=True)
    assert report["ema"] is True and report["top1"] == stored["metrics"]["ema_top1"]  # as training measured it
    top1, _ = count_top1_top5(load_model(ckpt, use_ema=True), *test_images, CIFAR10_MEAN, CIFAR10_STD)
    assert report["top1"] == top1
    assert any(not torch.equal(stored["model"][k], stored["ema"][k]) for k in stored["model"])  # really other weights


def test_other_resolution(ckpt, tmp_path):
    base = cvt_train.count_macs(load_model(ckpt), (3, 32, 32)) / 1e9
    result, report = cvt_eval([f"ckpt={ckpt}", "trainer.precision=fp32", "eval.resolution=48"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["resolution"] == 48 and report["images"] == N_TEST
    ratio = report["gmacs"] / base
    assert 2.0 < ratio < 2.8, ratio  # (48/32)^2 = 2.25 for the convolutions and MLPs, attention grows faster
    assert report["top1"] > 10.0


# --- weight files without a config: official and HF


def test_official_and_hf_weight_files(ckpt, cifar_root, test_images, tmp_path):
    transformers = pytest.importorskip("transformers")
    data = ["data=cifar10", f"data.root={cifar_root}", "data.num_workers=0", "trainer.precision=fp32"]
    images, labels = test_images
    ours = load_model(ckpt)

    official = tmp_path / "official.pth"
    torch.save(to_format(ours.state_dict(), "official"), official)
    result, report = cvt_eval([f"ckpt={official}", *MODEL, *data], tmp_path, "eval_official")
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["checkpoint_format"] == "official" and report["images"] == N_TEST
    assert report["top1"] == count_top1_top5(ours, images, labels, CIFAR10_MEAN, CIFAR10_STD)[0]

    # HF: the same weights in an HF model of the matching CvtConfig, written by save_pretrained
    stages = torch.load(ckpt, weights_only=True)["config"]["model"]["stages"]
    per_stage = lambda key, kind=None: [kind(s[key]) if kind else s[key] for s in stages]  # noqa: E731
    config = transformers.CvtConfig(
        num_labels=10,
        patch_sizes=per_stage("patch_size"),
        patch_stride=per_stage("patch_stride"),
        patch_padding=per_stage("patch_padding"),
        embed_dim=per_stage("dim_embed"),
        num_heads=per_stage("num_heads"),
        depth=per_stage("depth"),
        mlp_ratio=per_stage("mlp_ratio", float),
        drop_path_rate=per_stage("drop_path_rate", float),
        cls_token=per_stage("cls_token"),
    )
    hf = transformers.CvtForImageClassification(config).eval()
    hf.load_state_dict(to_format(ours.state_dict(), "hf"), strict=True)
    hf.save_pretrained(tmp_path / "hf")
    result, report = cvt_eval([f"ckpt={tmp_path / 'hf'}", *MODEL, "model.act=gelu", *data], tmp_path, "eval_hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["checkpoint_format"] == "hf"
    hf_top1, hf_top5 = count_top1_top5(hf, images, labels, CIFAR10_MEAN, CIFAR10_STD)  # HF's own forward
    assert (report["top1"], report["top5"]) == (hf_top1, hf_top5)
    assert hf_top1 > 20.0  # exact GELU instead of QuickGELU changes the trained model only a little

    result, _ = cvt_eval([f"ckpt={official}", *data], tmp_path, "eval_no_model")
    assert_one_error_line(result, "model=")


def test_subset_trained_checkpoint_is_evaluated_on_the_whole_split(cifar_root, tmp_path):
    """A smoke run trained and validated on subsets (data.val_subset=30): cvt-eval eval.split=test uses all N_TEST
    test images, and only a data.val_subset given to cvt-eval itself subsamples them; eval.json says how many."""
    run_dir = tmp_path / "run"
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *FAST,
                "data=cifar10",
                f"data.root={cifar_root}",
                "trainer.epochs=1",
                "trainer.max_steps_per_epoch=1",
                "data.train_subset=100",
                "data.val_subset=30",
            ],
        )
    train(cfg, run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["images"] == 30
    result, report = cvt_eval([f"ckpt={run_dir / 'last.pt'}", "eval.split=test", "trainer.precision=fp32"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["images"] == N_TEST
    result, report = cvt_eval(
        [f"ckpt={run_dir / 'last.pt'}", "eval.split=test", "data.val_subset=20"], tmp_path, name="subset"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["images"] == 20
    assert cvt_train.load_model(run_dir / "last.pt").cfg.name == "cvt_cifar_tiny"  # at the package's top level


@pytest.mark.parametrize("name,paper", [("cvt13", 4.5), ("cvt21", 7.1)])
def test_gmacs_at_224_match_the_paper(name, paper, tmp_path):
    """An official-format file with a 10-class head (the head is 0.01% of the MACs) on a few 32px PNGs the
    folder pipeline resizes to 224."""
    root = write_image_folder(tmp_path / "folder", {"train": 10, "val": 10})
    model = cvt_train.create_model(name, num_classes=10, init="xavier")
    torch.save(to_format(model.state_dict(), "official"), tmp_path / f"{name}.pth")
    result, report = cvt_eval(
        [
            f"ckpt={tmp_path / f'{name}.pth'}",
            f"model={name}",
            "data=folder",
            f"data.root={root}",
            "data.num_classes=10",
            "data.image_size=224",
            "data.num_workers=0",
            "data.val_subset=2",
            "eval.batch_size=2",
            "trainer.precision=fp32",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["resolution"] == 224 and report["images"] == 2
    assert report["gmacs"] == pytest.approx(paper, rel=0.02)


# --- bad input: one `error: ...` line, non-zero exit, no traceback


def write_cifar100_python(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    out = root / "cifar-100-python"
    out.mkdir(parents=True)
    images, labels = make_images(n_train + n_test, num_classes=100)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    for name, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        (out / name).write_bytes(
            pickle.dumps(
                {b"data": flat[sl], b"fine_labels": labels[sl].tolist(), b"coarse_labels": (labels[sl] // 5).tolist()}
            )
        )
    (out / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    return root


@pytest.mark.parametrize("case", ["missing", "classes_own", "classes_official", "architecture", "split"])
def test_bad_input_is_one_line(case, ckpt, cifar_root, tmp_path):
    if case == "missing":
        args, fragments = [f"ckpt={tmp_path / 'nowhere' / 'best.pt'}"], ["not found", "nowhere"]
    elif case == "classes_own":  # trained on 10 classes, evaluated on CIFAR-100
        root = write_cifar100_python(tmp_path / "c100")
        args, fragments = [f"ckpt={ckpt}", "data=cifar100", f"data.root={root}"], ["10", "100"]
    elif case == "classes_official":  # an ImageNet head against CIFAR-10
        model = cvt_train.create_model("cvt_cifar_tiny", num_classes=1000, init="xavier")
        torch.save(to_format(model.state_dict(), "official"), tmp_path / "in1k.pth")
        args = [f"ckpt={tmp_path / 'in1k.pth'}", "model=cvt_cifar_tiny", "data=cifar10", f"data.root={cifar_root}"]
        fragments = ["1000", "10"]
    elif case == "architecture":  # official weights of one model evaluated as another
        model = cvt_train.create_model("cvt_cifar_tiny", num_classes=10, init="xavier")
        torch.save(to_format(model.state_dict(), "official"), tmp_path / "tiny.pth")
        args = [f"ckpt={tmp_path / 'tiny.pth'}", "model=cvt_cifar_small", "data=cifar10", f"data.root={cifar_root}"]
        fragments = ["tiny.pth", "model=cvt_cifar_small", "does not fit"]
    else:
        args, fragments = [f"ckpt={ckpt}", "eval.split=holdout"], ["eval.split", "holdout"]
    result, report = cvt_eval(args, tmp_path)
    assert_one_error_line(result, *fragments)
    assert report is None


# --- sweep summary


def test_summarize_sweep_on_a_real_two_job_sweep(cifar_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run(
        [
            sys.executable,
            "-m",
            "cvt_train.train",
            "-m",
            *FAST,
            "data=cifar10",
            f"data.root={cifar_root}",
            "trainer.epochs=1",
            "data.train_subset=100",
            "model.stages.0.patch_stride=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("summary.md", "summary.csv"):  # written by the sweep's own callback; the script must redo them
        (sweep / name).unlink()

    result = run([sys.executable, str(REPO / "scripts" / "summarize_sweep.py"), str(sweep)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    md = (sweep / "summary.md").read_text()
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and len(md.strip().splitlines()) == 4  # header, rule, 2 jobs
    key = "model.stages.0.patch_stride"
    for column in (key, "top1", "top5", "params", "gmacs", "images_per_s", "wall_time_s"):
        assert column in rows[0] and column in md, column
    assert "data.root" not in rows[0]  # only the overrides that vary
    assert [r[key] for r in rows] == ["1", "2"]
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        for column in ("top1", "top5", "gmacs", "images_per_s", "wall_time_s"):
            assert float(row[column]) == pytest.approx(metrics[column], rel=1e-6), column
        assert int(row["params"]) == metrics["params"]
    assert float(rows[0]["gmacs"]) > 2 * float(rows[1]["gmacs"])  # stride 1 keeps a 4x larger first map

    for not_a_sweep in (tmp_path / "nowhere", sweep / "0"):  # missing, and a dir without job dirs
        result = run([sys.executable, str(REPO / "scripts" / "summarize_sweep.py"), str(not_a_sweep)], cwd=tmp_path)
        assert result.returncode != 0 and result.stderr.startswith("error:"), result.stderr[-2000:]
    assert not (sweep / "0" / "summary.md").exists()
