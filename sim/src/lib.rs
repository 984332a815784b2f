//! # inferlab-sim: deterministic replay of LLM serving
