"""The run plots draw exactly the history's numbers as a valid PNG, and refuse bad workdirs clearly.

No training here: each test writes a synthetic history.jsonl (and summary.json) into tmp_path.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.collections import PolyCollection

from infinito_jax import plot
from infinito_jax.errors import ConfigError, DataError, InfinitoError, WorkdirError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORACLE = 19.3


def history(seed: int = 0, replicas: int = 1, steps: int = 600, log_every: int = 20,
            val_every: int = 117) -> list[dict]:
  """A realistic run's records: a decaying noisy train loss every log_every steps, one
  validation record per replica every val_every steps, and records of other kinds between."""
  rng = np.random.default_rng(seed)
  recs = [{"kind": "config_change", "step": 0, "changes": {"train.learning_rate": [1e-3, 5e-4]}}]
  for step in range(log_every, steps + 1, log_every):
    base = 3.0 + 3.5 * math.exp(-step / 150) + 0.3 * seed
    rec = {"kind": "train", "epoch": 1 + step // val_every, "step": step,
           "loss": base + float(rng.normal(0, 0.05)), "learning_rate": 1e-3, "grad_norm": 1.0,
           "tokens_per_s": 5e4}
    if replicas > 1:
      rec["replica_losses"] = [rec["loss"] + 0.1 * (r - (replicas - 1) / 2)
                               for r in range(replicas)]
    recs.append(rec)
    if step % (5 * log_every) == 0:
      recs.append({"kind": "sample", "step": step, "text": "the cat sat"})
    for v in range(val_every, steps + 1, val_every):
      if step - log_every < v <= step:
        for r in range(replicas):
          loss = base + 0.2 + 0.15 * r + float(rng.normal(0, 0.02))
          recs.append({"kind": "validation", "step": v, "epoch": v / val_every, "replica": r,
                       "seed": 42 + r, "loss": loss, "perplexity": math.exp(loss)})
  return recs


def write_run(folder: pathlib.Path, records: list[dict], oracle: float | None = None,
              summary: bool = True) -> str:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if summary:
    s = {"best_val_perplexity": 30.0}
    if oracle is not None:
      s["corpus"] = {"oracle_perplexity": oracle, "entropy_rate_nats": math.log(oracle)}
    (folder / "summary.json").write_text(json.dumps(s))
  return str(folder)


def lines_by_label(ax) -> dict:
  return {line.get_label(): line for line in ax.get_lines()}


def of(records, kind, key, replica=0):
  return [r[key] for r in records if r["kind"] == kind and r.get("replica", 0) == replica]


def test_png_is_valid_and_sized(tmp_path):
  """write_plot writes a real PNG of figsize*dpi pixels at <first workdir>/compare.png for
  several runs (the first run's own curves.png is left as it is) and at <workdir>/curves.png
  for one, via a temporary file that does not survive."""
  a = write_run(tmp_path / "a", history(0), oracle=ORACLE)
  b = write_run(tmp_path / "b", history(1))
  own = plot.write_plot([a])
  assert own == os.path.join(a, "curves.png")
  before = pathlib.Path(own).read_bytes()
  path = plot.write_plot([a, b])
  assert path == os.path.join(a, "compare.png") and pathlib.Path(own).read_bytes() == before
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_SIGNATURE
  img = mpimg.imread(path)
  w, h = (round(x * plot.DPI) for x in plot.FIGSIZE)
  assert img.ndim == 3 and img.shape[:2] == (h, w) and img.shape[2] in (3, 4)
  assert img.std() > 0  # something was drawn, not a blank canvas
  assert not os.path.exists(path + ".tmp")
  out = plot.write_plot([a], out=str(tmp_path / "elsewhere.png"))
  assert out == str(tmp_path / "elsewhere.png") and mpimg.imread(out).shape[:2] == (h, w)


def test_two_runs_lines_equal_history(tmp_path):
  """Two runs with train+validation and one oracle give exactly 5 lines per panel (2 train, 2
  validation, 1 oracle), whose data are the history's values: loss, exp(loss), the validation
  records' loss and perplexity, the oracle and its log; other record kinds are ignored."""
  ha, hb = history(0), history(1)
  a = write_run(tmp_path / "run_a", ha, oracle=ORACLE)
  b = write_run(tmp_path / "run_b", hb)
  fig = plot.make_figure([a, b])
  ax_loss, ax_ppl = fig.axes
  assert len(ax_loss.get_lines()) == 5 and len(ax_ppl.get_lines()) == 5
  assert ax_ppl.get_yscale() == "log" and ax_loss.get_yscale() == "linear"
  loss, ppl = lines_by_label(ax_loss), lines_by_label(ax_ppl)
  expected = {"run_a train", "run_a validation", "oracle run_a", "run_b train", "run_b validation"}
  assert set(loss) == set(ppl) == expected
  for name, h in (("run_a", ha), ("run_b", hb)):
    np.testing.assert_array_equal(loss[f"{name} train"].get_xdata(), of(h, "train", "step"))
    np.testing.assert_array_equal(loss[f"{name} train"].get_ydata(), of(h, "train", "loss"))
    np.testing.assert_allclose(ppl[f"{name} train"].get_ydata(),
                               np.exp(of(h, "train", "loss")), rtol=1e-12)
    np.testing.assert_array_equal(ppl[f"{name} validation"].get_xdata(), [117, 234, 351, 468, 585])
    np.testing.assert_array_equal(loss[f"{name} validation"].get_ydata(),
                                  of(h, "validation", "loss"))
    np.testing.assert_array_equal(ppl[f"{name} validation"].get_ydata(),
                                  of(h, "validation", "perplexity"))
  np.testing.assert_allclose(ppl["oracle run_a"].get_ydata(), [ORACLE, ORACLE])
  np.testing.assert_allclose(loss["oracle run_a"].get_ydata(), [math.log(ORACLE)] * 2)
  assert ppl["oracle run_a"].get_linestyle() == "--"
  # one colour per run, shared by its lines in both panels
  assert ppl["run_a train"].get_color() == ppl["run_a validation"].get_color() == \
      loss["oracle run_a"].get_color() != ppl["run_b train"].get_color()
  legend = [t.get_text() for t in ax_ppl.get_legend().get_texts()]
  assert sorted(legend) == sorted(expected)
  assert not ax_ppl.collections  # one replica: no band


def test_replicas_mean_and_min_max_band(tmp_path):
  """With 3 replicas the validation line is their mean per step, the band spans exactly their
  min..max, and the train line is the logged (mean) loss; records out of step order and a
  repeated record are sorted and deduplicated."""
  h = history(0, replicas=3)
  train = [r for r in h if r["kind"] == "train"]
  vals = [r for r in h if r["kind"] == "validation"]
  shuffled = list(reversed(h)) + [dict(vals[-1])]  # a resume's overlap: the same record twice
  run = write_run(tmp_path / "pop", shuffled)
  fig = plot.make_figure([run], labels=["population"])
  ax_loss, ax_ppl = fig.axes
  assert len(ax_ppl.get_lines()) == 2  # train, validation: no oracle without corpus
  steps = sorted({r["step"] for r in vals})
  by_step = {s: [r for r in vals if r["step"] == s] for s in steps}
  ppl = lines_by_label(ax_ppl)
  val_line = ppl["population validation (mean of 3)"]
  np.testing.assert_array_equal(val_line.get_xdata(), steps)
  np.testing.assert_allclose(val_line.get_ydata(),
                             [np.mean([r["perplexity"] for r in by_step[s]]) for s in steps],
                             rtol=1e-12)
  np.testing.assert_allclose(lines_by_label(ax_loss)["population validation (mean of 3)"]
                             .get_ydata(), [np.mean([r["loss"] for r in by_step[s]])
                                            for s in steps], rtol=1e-12)
  np.testing.assert_array_equal(ppl["population train"].get_ydata(),
                                np.exp([r["loss"] for r in train]))
  for ax, key in ((ax_ppl, "perplexity"), (ax_loss, "loss")):
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    xy = bands[0].get_paths()[0].vertices
    for s in steps:
      ys = xy[np.isclose(xy[:, 0], s), 1]
      values = [r[key] for r in by_step[s]]
      assert ys.min() == pytest.approx(min(values), rel=1e-12)
      assert ys.max() == pytest.approx(max(values), rel=1e-12)
      assert min(values) < max(values)  # a real spread, so the band is not a line


def test_oracle_only_when_summary_has_it(tmp_path):
  """The dashed oracle line is drawn only for a run whose summary.json has
  corpus.oracle_perplexity: not for real text (no corpus key), nor without summary.json; runs
  with the same oracle share one line named after all of them."""
  real = write_run(tmp_path / "real", history(0))
  bare = write_run(tmp_path / "bare", history(1), summary=False)
  synth = write_run(tmp_path / "synth", history(2), oracle=ORACLE)

  def dashed(fig):
    return [(line.get_label(), float(line.get_ydata()[0])) for line in fig.axes[1].get_lines()
            if line.get_linestyle() == "--"]

  assert dashed(plot.make_figure([real, bare])) == []
  assert dashed(plot.make_figure([real, synth])) == [("oracle synth", pytest.approx(ORACLE))]
  # runs on one corpus share one grey line; another corpus gets its own, in its run's colour
  twin = write_run(tmp_path / "twin", history(3), oracle=ORACLE)
  other = write_run(tmp_path / "other", history(4), oracle=7.5)
  fig = plot.make_figure([synth, real, twin, other])
  assert dashed(fig) == [("oracle synth, twin", pytest.approx(ORACLE)),
                         ("oracle other", pytest.approx(7.5))]
  colors = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
  assert colors["oracle synth, twin"] == "0.35" and colors["oracle other"] == colors["other train"]


def test_missing_workdir_and_history_errors(tmp_path):
  """A workdir that does not exist, or has no history.jsonl, raises WorkdirError (an
  InfinitoError) whose message names the path; wrong label counts are a ConfigError."""
  missing = str(tmp_path / "nope")
  with pytest.raises(WorkdirError, match="does not exist") as e:
    plot.make_figure([missing])
  assert missing in str(e.value) and isinstance(e.value, InfinitoError)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(WorkdirError) as e:
    plot.write_plot([str(empty)])
  assert str(e.value) == f"no history.jsonl in {empty}: is it a train.py --workdir?"
  assert not (empty / "curves.png").exists()
  good = write_run(tmp_path / "good", history(0))
  with pytest.raises(ConfigError, match="2 labels"):
    plot.make_figure([good], labels=["x", "y"])


def test_damaged_lines(tmp_path):
  """A truncated last line (a kill mid-write) is skipped with a warning and the rest plotted;
  a damaged line elsewhere is a DataError naming the file and line."""
  h = history(0)
  run = write_run(tmp_path / "cut", h)
  with open(os.path.join(run, "history.jsonl"), "a") as f:
    f.write('{"kind": "validation", "step": 702, "lo')
  with pytest.warns(UserWarning, match="damaged last line"):
    fig = plot.make_figure([run])
  val = lines_by_label(fig.axes[1])["cut validation"]
  np.testing.assert_array_equal(val.get_ydata(), of(h, "validation", "perplexity"))
  lines = pathlib.Path(run, "history.jsonl").read_text().splitlines()
  lines.insert(3, "garbage")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "history.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"history.jsonl is damaged at line 4 of"):
    plot.make_figure([str(bad)])


def test_a_diverged_run_is_drawn_clipped_and_a_malformed_replica_is_skipped(tmp_path, recwarn):
  """Losses of 700 and 1e308 (a float spike before NaN) used to empty the perplexity panel
  (matplotlib's log margins overflow) with overflow warnings; they are drawn at LOSS_MAX /
  PPL_MAX, on finite axes, without a warning. A validation record whose replica is not an
  integer is left out instead of stopping the plot with a TypeError."""
  h = history(0, steps=240)
  h += [{"kind": "train", "step": 260, "loss": 700.0},
        {"kind": "train", "step": 280, "loss": 1e308},
        {"kind": "validation", "step": 280, "loss": 1e308},
        {"kind": "validation", "step": 290, "loss": 3.9, "replica": [0]}]
  run = write_run(tmp_path / "diverged", h)
  fig = plot.make_figure([run])
  ax_loss, ax_ppl = fig.axes
  ppl = lines_by_label(ax_ppl)
  np.testing.assert_allclose(ppl["diverged train"].get_ydata()[-2:], [plot.PPL_MAX] * 2,
                             rtol=1e-12)
  assert ppl["diverged validation"].get_xdata()[-1] == 280  # step 290's record is left out
  assert ppl["diverged validation"].get_ydata()[-1] == pytest.approx(plot.PPL_MAX, rel=1e-12)
  assert lines_by_label(ax_loss)["diverged train"].get_ydata()[-1] == plot.LOSS_MAX
  for ax in (ax_loss, ax_ppl):
    low, high = ax.get_ylim()
    assert np.isfinite([low, high]).all() and high >= ax.get_lines()[0].get_ydata().max()
  assert ax_ppl.get_ylim()[1] >= 0.99 * plot.PPL_MAX
  assert plot.write_plot([run], str(tmp_path / "d.png")).endswith("d.png")
  assert not [w for w in recwarn.list if "overflow" in str(w.message)]
  with pytest.warns(UserWarning, match="more than once"):
    plot.make_figure([run, run + "/"])


def test_nan_losses_are_named_in_a_warning_and_inf_is_drawn_clipped(tmp_path):
  """A history holding NaN (json's NaN, a foreign or hand-edited file) used to lose those
  records without a word: they are still not drawn, but a warning names how many and their
  steps; +inf (json's Infinity) is a diverged value, drawn at LOSS_MAX like 1e308."""
  h = history(0, steps=240)
  h += [{"kind": "train", "step": 260, "loss": float("nan")},
        {"kind": "train", "step": 280, "loss": float("inf")},
        {"kind": "validation", "step": 280, "loss": float("nan"), "replica": 0},
        {"kind": "train", "step": 300, "loss": "3.1"}]
  run = write_run(tmp_path / "nan", h)
  with pytest.warns(UserWarning, match=r"3 step\(s\) with a train or validation loss that is "
                    r"NaN, -inf or not a number are not drawn \(step 260, 280, 300\)"):
    fig = plot.make_figure([run])
  train = lines_by_label(fig.axes[0])["nan train"]
  assert list(train.get_xdata()[-2:]) == [240, 280]
  assert train.get_ydata()[-1] == plot.LOSS_MAX
  assert 280 not in lines_by_label(fig.axes[0])["nan validation"].get_xdata()
  clean = write_run(tmp_path / "clean", history(0, steps=240))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    plot.make_figure([clean])  # a run without such records warns of nothing


def test_runs_without_records_yet(tmp_path):
  """A run with no train/validation record yet is skipped (with a warning) beside one that has
  some; only when no run has any is it a DataError naming the workdirs."""
  young = write_run(tmp_path / "young", [{"kind": "import", "step": 0}], summary=False)
  only_val = write_run(tmp_path / "only_val", [r for r in history(0) if r["kind"] == "validation"])
  with pytest.warns(UserWarning, match="young has no train or validation record"):
    fig = plot.make_figure([young, only_val])
  assert list(lines_by_label(fig.axes[1])) == ["only_val validation"]
  with pytest.raises(DataError, match="nothing to plot yet") as e:
    plot.make_figure([young])
  assert young in str(e.value)


def test_run_whose_every_loss_is_nan(tmp_path):
  """A history whose every loss is NaN is a diverged run, named as such, not one without
  records yet; beside a good run it is not also said to have no records."""
  diverged = [dict(r, loss=float("nan")) for r in history(0) if r["kind"] in ("train", "validation")]
  bad = write_run(tmp_path / "bad", diverged)
  with pytest.raises(DataError, match="every train and validation loss") as e:
    plot.make_figure([bad])
  assert bad in str(e.value) and "yet" not in str(e.value)
  good = write_run(tmp_path / "good", history(1))
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    plot.make_figure([bad, good])
  said = [str(w.message) for w in seen]
  assert any("NaN" in m and bad in m for m in said), said
  assert not any("no train or validation record" in m for m in said), said


def test_cli(tmp_path):
  """`python -m infinito_jax.plot A B --out X --labels` writes the PNG, prints `Wrote X` and
  exits 0, without importing pyplot; a bad workdir exits 1 with one `error:` line."""
  a = write_run(tmp_path / "a", history(0), oracle=ORACLE)
  b = write_run(tmp_path / "b", history(1))
  out = tmp_path / "both.png"
  ok = subprocess.run([sys.executable, "-m", "infinito_jax.plot", a, b, "--out", str(out),
                       "--labels", "small,large"], cwd=ROOT, capture_output=True, text=True,
                      timeout=120, check=False)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == f"Wrote {out}"
  assert out.read_bytes()[:8] == PNG_SIGNATURE
  bad = subprocess.run([sys.executable, "-m", "infinito_jax.plot", str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert bad.returncode == 1 and bad.stdout == ""
  assert bad.stderr.splitlines() == [
      f"error: workdir {tmp_path / 'nope'} does not exist: pass the --workdir of a training run."]
  # importing and drawing never loads pyplot (a notebook's backend stays the user's)
  probe = subprocess.run(
      [sys.executable, "-c", "import sys; from infinito_jax import plot; "
       f"plot.make_figure([{a!r}]); print('matplotlib.pyplot' in sys.modules)"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert probe.stdout.strip() == "False", probe.stderr


def test_a_run_whose_folder_starts_with_an_underscore_keeps_its_legend(tmp_path, recwarn):
  """matplotlib drops labels that start with '_' from a legend; a study's grouped runs live in
  runs/_values-<hash>, so their curves would lose their names (and matplotlib warn)."""
  run = write_run(tmp_path / "_values-ab12", history(replicas=2))
  fig = plot.make_figure([run])
  names = [t.get_text().strip() for t in fig.axes[0].get_legend().get_texts()]
  assert names == ["_values-ab12 train", "_values-ab12 validation (mean of 2)"]
  assert not [w for w in recwarn if "No artists with labels" in str(w.message)]


def test_dollar_signs_in_names_are_shown_and_a_single_record_is_drawn(tmp_path):
  """matplotlib reads text between two '$' as math (a '$\\frac$' label was a parse error, the
  plot unwritten); names are shown as written. A run with one train record is drawn as a
  point, not an invisible one-point line."""
  run = write_run(tmp_path / "lr$\\frac$", history()[:2])  # config_change + one train
  path = plot.write_plot([run], out=str(tmp_path / "p.png"), labels=["a$b$c"])
  fig = plot.make_figure([run], labels=["a$b$c"])
  names = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert names[0] == "a\\$b\\$c train" and pathlib.Path(path).read_bytes()[:8] == PNG_SIGNATURE
  plot.write_plot([run])  # the folder's name as the label
  (train,) = [l for l in fig.axes[0].get_lines() if l.get_label().endswith("train")]
  assert len(train.get_xdata()) == 1 and train.get_marker() == "."


def test_out_never_replaces_a_file_that_is_no_plot_nor_writes_among_checkpoints(tmp_path):
  """--out replaced any existing file with an image suffix (notes.pdf), and wrote inside a
  run's checkpoints folder (whose step folders Orbax deletes): both are refused, the file left
  as it was; a plot matplotlib wrote (PNG, PDF, SVG) is replaced as before."""
  a = write_run(tmp_path / "a", history(0))
  notes = tmp_path / "notes.pdf"
  notes.write_text("important")
  with pytest.raises(WorkdirError, match=r"exists and is not a plot written by matplotlib"):
    plot.write_plot([a], str(notes))
  assert notes.read_text() == "important"
  (pathlib.Path(a) / "checkpoints" / "60").mkdir(parents=True)
  with pytest.raises(WorkdirError, match=r"lies inside the run's checkpoints folder"):
    plot.write_plot([a], str(pathlib.Path(a) / "checkpoints" / "60" / "x.png"))
  assert os.listdir(pathlib.Path(a) / "checkpoints" / "60") == []
  # nor inside the checkpoints of a run it does not plot, directly or through a link
  b = write_run(tmp_path / "b", history(1))
  (pathlib.Path(b) / "checkpoints" / "30").mkdir(parents=True)
  (tmp_path / "link").symlink_to(pathlib.Path(b) / "checkpoints" / "30")
  for out in (pathlib.Path(b) / "checkpoints" / "x.png", tmp_path / "link" / "x.png"):
    with pytest.raises(WorkdirError, match=rf"--out {out} lies inside the run's checkpoints "
                                           rf"folder {tmp_path / 'b' / 'checkpoints'}, whose"):
      plot.write_plot([a], str(out))
  assert sorted(os.listdir(pathlib.Path(b) / "checkpoints")) == ["30"]
  # a run's checkpoints folder that is itself a link (to a bigger disk): its name is in the
  # path as given, and its target's step folders bear Orbax's mark
  c = write_run(tmp_path / "c", history(2))
  store = tmp_path / "ext" / "ckstore"
  (store / "30").mkdir(parents=True)
  (store / "30" / plot.ORBAX_STEP_MARK).write_text("{}")
  (pathlib.Path(c) / "checkpoints").symlink_to(store)
  for out in (pathlib.Path(c) / "checkpoints" / "y.png", store / "30" / "z.png"):
    with pytest.raises(WorkdirError, match=r"lies inside the run's checkpoints folder"):
      plot.write_plot([a], str(out))
  assert os.listdir(store / "30") == [plot.ORBAX_STEP_MARK]
  # a folder named checkpoints beside a config.json of no run (a project's) is not a run's
  (tmp_path / "proj" / "checkpoints").mkdir(parents=True)
  (tmp_path / "proj" / "config.json").write_text("{}")
  plot.write_plot([a], str(tmp_path / "proj" / "checkpoints" / "p.png"))
  # a file that only mentions matplotlib is no plot of matplotlib's (it was overwritten)
  (pathlib.Path(b) / "compare.png").write_text("see the matplotlib docs")
  with pytest.raises(WorkdirError, match=r"compare.png \(the plot's default path\) exists"):
    plot.write_plot([b, a])
  (pathlib.Path(b) / "compare.png").unlink()
  # part of a run a killed --fresh was moving: refused (a plot written there blocked the
  # next --fresh from finishing the move)
  from infinito_jax import lifecycle  # pylint: disable=g-import-not-at-top
  (tmp_path / "b.old-1").mkdir()
  lifecycle._note_move(b, str(tmp_path / "b.old-1"))  # pylint: disable=protected-access
  for runs in ([b], [str(tmp_path / "b.old-1")]):
    with pytest.raises(WorkdirError, match=r"was killed while it moved the previous run"):
      plot.write_plot(runs)
  for folder in (b, tmp_path / "b.old-1"):
    os.remove(os.path.join(folder, lifecycle.MOVE_NOTE))
  # the default path is guarded as --out is: a file of the user's named curves.png or
  # compare.png stays (it was overwritten), a folder there is named as such
  for runs, name in (([b], "curves.png"), ([b, a], "compare.png")):
    (pathlib.Path(b) / name).write_text("mine")
    with pytest.raises(WorkdirError, match=rf"{name} \(the plot's default path\) exists and is "
                                           r"not a plot .* Move it away, or write the plot "
                                           r"elsewhere \(the plot command's --out\)"):
      plot.write_plot(runs)
    assert (pathlib.Path(b) / name).read_text() == "mine"
  (pathlib.Path(b) / "curves.png").unlink()
  (pathlib.Path(b) / "curves.png").mkdir()
  with pytest.raises(WorkdirError, match=r"curves.png \(the plot's default path\) is a folder: "
                                         r"move it away, or give --out another file name"):
    plot.write_plot([b])
  for suffix in ("png", "pdf", "svg", "svgz", "eps"):
    out = tmp_path / f"plot.{suffix}"
    plot.write_plot([a], str(out))
    first = out.stat().st_mtime_ns
    os.utime(out, ns=(first - 10**9, first - 10**9))
    plot.write_plot([a], str(out))  # its own plot: replaced
    assert out.stat().st_mtime_ns > first - 10**9 and plot.is_plot(str(out))
  # a PDF of many objects: matplotlib's /Creator sits more than 4 KiB before the end (with
  # ~150 distinct glyphs in the legend) and was not found
  labels = ["".join(chr(c) for c in range(start, end))
            for start, end in ((0x3B1, 0x3C9), (0x410, 0x450), (0xC0, 0x100))]
  runs = [a] + [write_run(tmp_path / n, history(i + 1)) for i, n in enumerate("bc")]
  big = tmp_path / "big.pdf"
  plot.write_plot(runs, str(big), labels)
  data = big.read_bytes()
  assert len(data) - data.index(b"/Creator (Matplotlib") > 4096
  plot.write_plot(runs, str(big), labels)  # replaced, as its own plot
