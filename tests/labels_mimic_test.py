"""The shipped ACES task configs on the real MIMIC-IV demo (../shared; skipped when absent), in
both of MIMIC-IV's lab-code forms: LAB//<itemid>//<unit> and LAB//RESULT//<itemid>//<unit>."""

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytest.importorskip("aces")

from cvmae_jax.data import meds  # noqa: E402
from cvmae_jax.tasks.aces_extract import extract_labels  # noqa: E402
from cvmae_jax.tasks.task_configs import TASKS_DIR, shipped_tasks  # noqa: E402


@pytest.fixture(scope="module")
def demo_forms(shared_meds_dir, tmp_path_factory):
    """{form: MEDS root}: the demo as shipped and a copy with every LAB// code rewritten."""
    result = tmp_path_factory.mktemp("result") / "meds"
    shutil.copytree(shared_meds_dir / "metadata", result / "metadata")
    rewritten = 0
    for path in meds.data_files(shared_meds_dir):
        table = pq.read_table(path)
        code = pc.replace_substring_regex(table["code"], "^LAB//", "LAB//RESULT//")
        rewritten += int(pc.sum(pc.starts_with(code, "LAB//RESULT//")).as_py())
        out = result / path.relative_to(shared_meds_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.set_column(table.schema.get_field_index("code"), "code", code), out)
    assert rewritten > 100_000
    return {"itemid": shared_meds_dir, "result": result}


@pytest.mark.parametrize("task", shipped_tasks())
def test_every_shipped_task_finds_a_cohort_in_both_lab_code_forms(demo_forms, task):
    cohorts = {form: extract_labels(TASKS_DIR / f"{task}.yaml", root)
               for form, root in demo_forms.items()}
    assert cohorts["itemid"].num_rows > 0
    assert pc.sum(cohorts["itemid"]["boolean_value"]).as_py() > 0
    assert cohorts["result"].equals(cohorts["itemid"])  # no task reads a lab code


def test_in_hospital_mortality_equals_the_demos_own_labels(demo_forms):
    """The demo's labels (its README: death in [admission, discharge + 1 day], admissions of
    more than 24 h) and the ACES config agree on every row."""
    root = demo_forms["itemid"]
    own = pa.concat_tables(pq.read_table(root / "labels" / "in_hospital_mortality_24h" /
                                         f"{s}.parquet") for s in meds.SPLITS)
    own = own.take(pc.sort_indices(own, [("subject_id", "ascending"),
                                         ("prediction_time", "ascending")]))
    got = extract_labels(TASKS_DIR / "in_hospital_mortality_24h.yaml", root)
    assert got.equals(own.select(["subject_id", "prediction_time", "boolean_value"]))
