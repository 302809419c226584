"""The wire contract shared by the client and the server: model and tensor names.

Defined once here; the Triton models, the tests and the client use these names, and they must
match the `config.pbtxt` files under model_repository/ (a test checks that they do). The server
imports only this module and `conversation` (the conversation schema) from this package.
"""

from __future__ import annotations

ENSEMBLE_MODEL = "reward_model"
PREPROCESSING_MODEL = "preprocessing"
ENGINE_MODEL = "reward_engine"
NEMO_MODEL = "nemo_reward_model"

CONVERSATION = "CONVERSATION"  # BYTES [1]: one JSON conversation
SCORE_TURNS = "SCORE_TURNS"  # BOOL [1], optional: also score every earlier assistant turn
# Instead of CONVERSATION (exactly one of the three per request; docs/gateway.md):
TEXT = "TEXT"  # BYTES [1], optional: UTF-8 text already in a chat template, scored as given
TOKENS = "TOKENS"  # INT32 [-1], optional: token ids scored as given, right-padded with -1
ADD_SPECIAL_TOKENS = "ADD_SPECIAL_TOKENS"  # BOOL [1], optional, TEXT only: start with the tokenizer's BOS, never twice (default true)
KEEP_LAST_TOKENS = "KEEP_LAST_TOKENS"  # INT32 [1], optional: cut from the left to N tokens (a conversation: whole earliest turns); 0: none
INPUT_IDS = "INPUT_IDS"  # INT32 [-1]: the templated token ids
NUM_TOKENS = "NUM_TOKENS"  # INT32 [1]: how many tokens were scored
SCORE_AT = "SCORE_AT"  # INT32 [-1]: token positions where scores are read (assistant-turn ends), -1 padded
REWARD = "REWARD"  # FP32 [1]: the reward of the final assistant turn
ATTRIBUTES = "ATTRIBUTES"  # FP32 [-1]: all N outputs of the reward head for the final assistant turn
ATTRIBUTE_NAMES = "ATTRIBUTE_NAMES"  # BYTES [-1]: the N output names, in order
TURN_REWARDS = "TURN_REWARDS"  # FP32 [-1]: the reward at the end of each assistant turn, NaN padded
TURN_ATTRIBUTES = "TURN_ATTRIBUTES"  # FP32 [-1, -1]: the N outputs at the end of each assistant turn, NaN padded

MAX_BATCH_SIZE = 64  # rows one request may carry (max_batch_size of the ensemble and its models)
# grpc's own INTERNAL status details for a call whose connection failed under it (a server killed mid-call), never an
# answer of Triton's: both sides treat it as the outage it is (the gRPC front answers UNAVAILABLE, the client retries)
GRPC_LOST_CALL = "Internal error from Core"
