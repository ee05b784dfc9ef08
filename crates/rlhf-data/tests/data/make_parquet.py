"""Write the Parquet test files (pyarrow, as HF datasets and pandas write them).

conversational.parquet: preference rows in TRL's conversational form (list<struct<role,content>>),
with a Llama 2 degree, safety labels as a struct, and a null margin in one row (snappy).
zstd.parquet: one text row compressed with zstd, which this crate does not read (to test the message).
Run: /work/scratch/venv/bin/python make_parquet.py
"""
import pyarrow as pa, pyarrow.parquet as pq

def m(role, content):
    return {"role": role, "content": content}

rows = [
    {"prompt": [m("user", "Hi?")], "chosen": [m("assistant", "Hello!")], "rejected": [m("assistant", "Go.")],
     "degree": "significantly_better", "safety": {"chosen": "safe", "rejected": "unsafe"}, "margin": None},
    {"prompt": [m("system", "Be kind."), m("user", "2+2?")], "chosen": [m("assistant", "4")],
     "rejected": [m("assistant", "5")], "degree": None, "safety": None, "margin": 0.25},
]
pq.write_table(pa.Table.from_pylist(rows), "conversational.parquet", compression="snappy")
pq.write_table(pa.Table.from_pylist([{"text": "hello"}]), "zstd.parquet", compression="zstd")
