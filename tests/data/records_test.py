"""LabRecords: the prepared files decoded directly give exactly what tfds.data_source gives."""

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from cvmae_jax.data.prepare import prepare_dataset


@pytest.fixture(scope="module")
def prepared(tiny_meds_shared, tmp_path_factory):
    return prepare_dataset(tiny_meds_shared.config(), None, tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("split", ["train", "tuning", "held_out"])
def test_every_record_equals_the_tfds_data_source(prepared, split):
    reference = tfds.builder_from_directory(prepared.path).as_data_source(split)
    records = pickle.loads(pickle.dumps(prepared.data_source(split)))  # as workers get it
    assert len(records) == len(reference) == prepared.num_examples[split] > 0
    batch = records.__getitems__(list(range(len(records))))
    for i, want in enumerate(reference):
        for got in (records[i], batch[i]):
            assert got["example_id"] == want["example_id"] == i
            for key in ("times", "codes", "values"):
                assert got[key].dtype == want[key].dtype, key
                np.testing.assert_array_equal(got[key], want[key])


def test_a_record_without_a_field_is_refused_by_name(prepared):
    example = tf_example_pb2.Example()
    example.features.feature["example_id"].int64_list.value.append(0)
    example.features.feature["codes"].int64_list.value.extend([1, 2])
    records = prepared.data_source("train")
    with pytest.raises(ValueError, match=r"train.array_record.*record 7 of split 'train' lacks "
                                         r"field\(s\) \['times', 'values'\]"):
        records.decode(example.SerializeToString(), 7)
