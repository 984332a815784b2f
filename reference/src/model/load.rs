//! Format dispatch for checkpoints and tokenizers.

use std::path::{Path, PathBuf};

use inferlab_models::tokenizer::{self, BpeTokenizer, Llama2cTokenizer, Tokenizer};
use inferlab_models::{gguf, llama2c};
use inferlab_models::{Checkpoint, ModelsError};

use crate::{Error, Result};

/// Load a checkpoint, choosing the loader by what the path is: a `.gguf` file
/// (or any file starting with the GGUF magic), else a llama2.c `.bin` (legacy or
/// versioned header). Hugging Face safetensors directories are reported as
/// unsupported until their loader is wired in.
pub fn load_checkpoint(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "no such file or directory".into(),
        });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "gguf" || starts_with_gguf_magic(path) {
        return Ok(gguf::load_checkpoint(path)?);
    }
    if path.is_dir() || ext == "safetensors" {
        return Err(ModelsError::Unsupported {
            path: path.to_path_buf(),
            what: "safetensors checkpoints (loader not available in this build)".into(),
        }
        .into());
    }
    Ok(llama2c::load(path)?)
}

/// The tokenizer for `model_path`: `tokenizer_path` if given (a `.gguf` gives
/// its embedded BPE, anything else is read as llama2.c `tokenizer.bin`), else
/// the one embedded in a GGUF model, else one found beside the model
/// (llama2.c: `tok{vocab_size}.bin`, then `tokenizer.bin`).
pub fn load_tokenizer(
    model_path: impl AsRef<Path>,
    tokenizer_path: Option<&Path>,
) -> Result<Box<dyn Tokenizer>> {
    let model_path = model_path.as_ref();
    if let Some(p) = tokenizer_path {
        if p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Ok(Box::new(BpeTokenizer::open_gguf(p)?));
        }
        return Ok(Box::new(Llama2cTokenizer::load(p)?));
    }
    if let Some(t) = tokenizer::embedded_in(model_path)? {
        return Ok(t);
    }
    let dir = model_path.parent().unwrap_or(Path::new("."));
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut head = [0u8; llama2c::VERSIONED_HEADER_BYTES];
    if let Ok(bytes) = read_prefix(model_path, &mut head) {
        if let Ok((h, _, _)) = llama2c::parse_header(model_path, &head[..bytes]) {
            candidates.push(dir.join(format!("tok{}.bin", h.vocab_size)));
        }
    }
    candidates.push(dir.join("tokenizer.bin"));
    for c in &candidates {
        if c.exists() {
            return Ok(Box::new(Llama2cTokenizer::load(c)?));
        }
    }
    Err(Error::File {
        path: model_path.to_path_buf(),
        reason: format!(
            "no tokenizer given and none found beside the model (looked for {}); pass --tokenizer",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

fn read_prefix(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn starts_with_gguf_magic(path: &Path) -> bool {
    let mut b = [0u8; 4];
    matches!(read_prefix(path, &mut b), Ok(4)) && b == gguf::GGUF_MAGIC
}
