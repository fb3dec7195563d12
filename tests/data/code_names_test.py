"""Lab names from metadata/codes.parquet: read, carried with the prepared dataset, reported."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvmae_jax.data import code_names
from cvmae_jax.data.meds import MEDSFormatError
from cvmae_jax.data.prepare import prepare_dataset


def _write_codes(root, table: dict):
    pq.write_table(pa.table(table), root / code_names.CODES_FILE)


def test_name_adds_the_codes_unit_unless_the_description_has_it():
    assert code_names.lab_name("LAB//50912//mg/dL", "Creatinine") == "Creatinine [mg/dL]"
    assert code_names.lab_name("LAB//1//mg/dL", "Creatinine [mg/dL]") == "Creatinine [mg/dL]"
    assert code_names.lab_name("LAB//1//L", "Lactate") == "Lactate [L]"  # whole word only
    assert code_names.lab_name("LAB//1//UNK", "Pain") == "Pain"
    assert code_names.lab_name("LAB//1//mg/dL", None) == "LAB//1//mg/dL"
    assert code_names.lab_name("LAB//1//mg/dL", "") == "LAB//1//mg/dL"
    assert code_names.lab_name("LAB//1//mg/dL", float("nan")) == "LAB//1//mg/dL"


def test_short_name_keeps_the_unit():
    name = "Creatinine [Blood, Chemistry] (hosp labevents itemid 50912); unit mg/dL"
    short = code_names.short_name(name, "LAB//50912//mg/dL", width=24)
    assert short == "Creatinine [Blo… [mg/dL]" and len(short) == 24
    assert code_names.short_name("Creatinine", "LAB//1//mg/dL", width=24) == "Creatinine"


def test_markdown_cell_keeps_the_table_intact():
    assert code_names.markdown_cell("a|b\nc") == "a\\|b c"


def test_descriptions_fall_back_to_none(tmp_path):
    (tmp_path / "metadata").mkdir()
    codes = ("LAB//A//mg/dL", "LAB//B//x", "LAB//C//y")
    assert code_names.read_descriptions(tmp_path, codes) == (None, None, None)  # no file
    _write_codes(tmp_path, {"code": ["LAB//A//mg/dL"], "parent_codes": [["x"]]})
    assert code_names.read_descriptions(tmp_path, codes) == (None, None, None)  # no column
    _write_codes(tmp_path, {"code": ["LAB//A//mg/dL", "LAB//A//mg/dL", "LAB//B//x"],
                            "description": [None, " Albumin ", None]})
    assert code_names.read_descriptions(tmp_path, codes) == ("Albumin", None, None)


def test_unreadable_codes_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / code_names.CODES_FILE).write_bytes(b"not parquet")
    with pytest.raises(MEDSFormatError, match=r"metadata/codes.parquet: not a readable Parquet"):
        code_names.read_descriptions(tmp_path, ["LAB//A//mg/dL"])


def test_prepared_dataset_carries_and_reports_the_names(tiny_meds, tmp_path):
    _write_codes(tiny_meds.root, {"code": [tiny_meds.A, tiny_meds.B],
                                  "description": ["Creatinine", None]})
    prepared = prepare_dataset(tiny_meds.config(), None, tmp_path)
    assert prepared.stats.codes == (tiny_meds.A, tiny_meds.B, tiny_meds.D)
    assert prepared.descriptions == ("Creatinine", None, None)
    assert prepared.lab_names == ("Creatinine [mg/dL]", tiny_meds.B, tiny_meds.D)
    stats = json.loads(open(f"{prepared.path}/data_stats.json").read())
    assert [r["description"] for r in stats["codes"]] == ["Creatinine", None, None]
    assert [r["name"] for r in prepared.report["codes"]] == list(prepared.lab_names)
    text = open(f"{prepared.path}/prepare_report.md").read()
    assert f"| Creatinine [mg/dL] | `{tiny_meds.A}` | mg/dL |" in text
    assert f"| {tiny_meds.B} | `{tiny_meds.B}` | mmol/L |" in text  # no description: the code


def test_the_shared_mimic_sample_names_its_labs(shared_meds_dir):
    creatinine = "LAB//50912//mg/dL"
    (description,) = code_names.read_descriptions(shared_meds_dir, [creatinine])
    assert description.startswith("Creatinine")
    assert code_names.lab_name(creatinine, description) == description  # its unit is in it
