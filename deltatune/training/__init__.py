"""Fine-tuning: JSONL data, the training loop, checkpoints/resume, DDP, evaluation.

Python API::

    from deltatune.training import TaskSpec, TrainConfig, Trainer, train, train_many
    result = train(data="train.jsonl", eval_data="eval.jsonl", r=16, alpha=32, out="runs/x")
    results = train_many(base, [TaskSpec("sql", "sql.jsonl", LoraConfig(r=16)), ...], tokenizer=tok)

CLI verbs (``deltatune train|eval|generate|chat``) live in ``commands``. Heavy imports
(transformers, matplotlib, tqdm) happen inside the functions that need them.
"""
from deltatune.training.api import TrainResult, evaluate_model, generate, load_inference_model, train
from deltatune.training.config import TrainConfig, TrainConfigError
from deltatune.training.data import DataError, Dataset, Example, load_dataset
from deltatune.training.loop import Trainer
from deltatune.training.many import TaskSpec, TrainManyResult, train_many

__all__ = ["DataError", "Dataset", "Example", "TaskSpec", "TrainConfig", "TrainConfigError", "TrainManyResult",
           "TrainResult", "Trainer", "evaluate_model", "generate", "load_dataset", "load_inference_model", "train",
           "train_many"]
