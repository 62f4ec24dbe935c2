//! Chat templates and labels, built turn by turn: every piece of text is tokenised on its own and
//! special tokens are appended by id, so the label mask can never drift from the ids (the
//! "tokenization mismatch" bug class of Python trainers).

use std::ops::Range;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::bad::BadReason;
use crate::config::{DataConfig, TemplateKind};
use crate::error::{DataError, Result};
use crate::pixels::ImageProblem;
use crate::records::{Record, Role};

/// Label of a position that carries no loss.
pub const IGNORE_INDEX: i64 = -100;

/// Token ids and labels of one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSample {
    pub input_ids: Vec<i64>,
    /// `IGNORE_INDEX` where no loss is taken, else the id itself (the model shifts).
    pub labels: Vec<i64>,
    /// Positions of each image's visual tokens, in image order.
    pub visual_spans: Vec<Range<usize>>,
    /// Whether the sequence was cut to `max_len`.
    pub truncated: bool,
}

/// Ids of the special tokens the templates write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    pub image: i64,
    pub bos: Option<i64>,
    pub plain_end: Option<i64>,
    pub start_header: Option<i64>,
    pub end_header: Option<i64>,
    pub eot: Option<i64>,
}

/// Tokeniser plus template: turns a record into ids and labels.
pub struct TextEncoder {
    pub tokenizer: Tokenizer,
    pub template: TemplateKind,
    pub special: SpecialIds,
    pub image_marker: String,
    pub max_len: usize,
    pub system_prompt: Option<String>,
}

impl TextEncoder {
    pub fn from_config(cfg: &DataConfig) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(&cfg.tokenizer).map_err(|e| DataError::Tokenizer {
            path: cfg.tokenizer.clone(),
            message: e.to_string(),
            hint: "`tokenizer` must point to a Hugging Face tokenizer.json".into(),
        })?;
        Self::new(tokenizer, cfg, &cfg.tokenizer)
    }

    /// `path` only names the tokenizer in errors.
    pub fn new(tokenizer: Tokenizer, cfg: &DataConfig, path: &Path) -> Result<Self> {
        let lookup = |name: &str, why: &str| -> Result<i64> {
            tokenizer.token_to_id(name).map(i64::from).ok_or_else(|| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("has no token `{name}` ({why})"),
                hint: "add it as a special token or change the [data] key that names it".into(),
            })
        };
        let optional = |name: &str, why: &str| -> Result<Option<i64>> {
            if name.is_empty() {
                Ok(None)
            } else {
                lookup(name, why).map(Some)
            }
        };
        let image = match cfg.image_token_id {
            Some(id) => id,
            None => lookup(&cfg.image_marker, "image_marker; or set image_token_id")?,
        };
        let llama3 = cfg.template == TemplateKind::Llama3;
        let llama3_only = |name: &str| -> Result<Option<i64>> {
            if llama3 {
                lookup(name, "llama3 template").map(Some)
            } else {
                Ok(None)
            }
        };
        let special = SpecialIds {
            image,
            bos: optional(&cfg.bos_token, "bos_token")?,
            plain_end: if llama3 { None } else { Some(lookup(&cfg.plain_end_token, "plain_end_token")?) },
            start_header: llama3_only("<|start_header_id|>")?,
            end_header: llama3_only("<|end_header_id|>")?,
            eot: llama3_only("<|eot_id|>")?,
        };
        Ok(Self {
            tokenizer,
            template: cfg.template,
            special,
            image_marker: cfg.image_marker.clone(),
            max_len: cfg.max_len,
            system_prompt: cfg.system_prompt.clone(),
        })
    }

    /// Checks the record's structure before any image is read: an assistant turn exists and the
    /// `<image>` markers match the images.
    pub fn check_structure(&self, record: &Record) -> std::result::Result<(), ImageProblem> {
        if !record.turns.iter().any(|t| t.role == Role::Assistant) {
            return Err((BadReason::NoAssistantTurn, "no `gpt` turn".into()));
        }
        let markers: usize = self.used_turns(record).map(|t| t.text.matches(&self.image_marker).count()).sum();
        if markers != record.images.len() {
            return Err((BadReason::ImageTokenMismatch, format!("{markers} `{}` marker(s) for {} image(s)", self.image_marker, record.images.len())));
        }
        Ok(())
    }

    /// Turns the template reads: `plain` uses the first user turn (for its markers) and the first
    /// assistant turn (the caption); `llama3` uses all.
    fn used_turns<'r>(&self, record: &'r Record) -> Box<dyn Iterator<Item = &'r crate::records::Turn> + 'r> {
        match self.template {
            TemplateKind::Llama3 => Box::new(record.turns.iter()),
            TemplateKind::Plain => {
                let first_user = record.turns.iter().find(|t| t.role == Role::User);
                let first_gpt = record.turns.iter().find(|t| t.role == Role::Assistant);
                Box::new(first_user.into_iter().chain(first_gpt))
            }
        }
    }

    /// Ids and labels for `record` whose i-th image brings `visual_tokens[i]` tokens.
    pub fn encode(&self, record: &Record, visual_tokens: &[usize]) -> std::result::Result<TokenizedSample, ImageProblem> {
        self.check_structure(record)?;
        let mut b = SequenceBuilder::new(self, visual_tokens);
        if let Some(bos) = self.special.bos {
            b.special(bos, false);
        }
        match self.template {
            TemplateKind::Plain => {
                // LLaVA's pretraining format: the user turn is only where the image goes.
                let user_markers = record.turns.iter().find(|t| t.role == Role::User).map_or(0, |t| t.text.matches(&self.image_marker).count());
                for _ in 0..user_markers {
                    b.visual()?;
                }
                let caption = record.turns.iter().find(|t| t.role == Role::Assistant).expect("checked");
                b.content(caption.text.trim(), true)?;
                b.special(self.special.plain_end.expect("plain template"), true);
            }
            TemplateKind::Llama3 => {
                if let Some(sys) = &self.system_prompt {
                    b.header("system");
                    b.text(sys, false);
                    b.special(self.special.eot.expect("llama3"), false);
                }
                for turn in &record.turns {
                    let (role, supervised) = match turn.role {
                        Role::System => ("system", false),
                        Role::User => ("user", false),
                        Role::Assistant => ("assistant", true),
                    };
                    b.header(role);
                    b.content(turn.text.trim(), supervised)?;
                    b.special(self.special.eot.expect("llama3"), supervised);
                }
            }
        }
        b.finish(self.max_len)
    }

    /// Ids of an inference prompt: the template up to where the assistant's answer begins
    /// (`llama3`: the user turn and the assistant header; `plain`: the visual tokens and the
    /// prompt text). `<image>` markers expand as in training; labels are all ignored.
    pub fn encode_prompt(&self, prompt: &str, visual_tokens: &[usize]) -> std::result::Result<TokenizedSample, ImageProblem> {
        let mut b = SequenceBuilder::new(self, visual_tokens);
        if let Some(bos) = self.special.bos {
            b.special(bos, false);
        }
        match self.template {
            TemplateKind::Plain => b.content(prompt.trim(), false)?,
            TemplateKind::Llama3 => {
                if let Some(sys) = &self.system_prompt {
                    b.header("system");
                    b.text(sys, false);
                    b.special(self.special.eot.expect("llama3"), false);
                }
                b.header("user");
                b.content(prompt.trim(), false)?;
                b.special(self.special.eot.expect("llama3"), false);
                b.header("assistant");
            }
        }
        if b.spans.len() != visual_tokens.len() {
            return Err((
                BadReason::ImageTokenMismatch,
                format!("{} `{}` marker(s) in the prompt for {} image(s)", b.spans.len(), self.image_marker, visual_tokens.len()),
            ));
        }
        Ok(TokenizedSample { input_ids: b.ids, labels: b.labels, visual_spans: b.spans, truncated: false })
    }

    fn tokenize(&self, text: &str) -> Vec<i64> {
        if text.is_empty() {
            return vec![];
        }
        let enc = self.tokenizer.encode(text, false).expect("byte-level tokenizers encode any text");
        enc.get_ids().iter().map(|&i| i64::from(i)).collect()
    }

    /// A readable piece for one id (used by `inspect`).
    pub fn piece(&self, id: i64) -> String {
        if id == self.special.image {
            return self.image_marker.clone();
        }
        u32::try_from(id).ok().and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_else(|| format!("<{id}>"))
    }
}

struct SequenceBuilder<'a> {
    enc: &'a TextEncoder,
    visual_tokens: &'a [usize],
    ids: Vec<i64>,
    labels: Vec<i64>,
    spans: Vec<Range<usize>>,
}

impl<'a> SequenceBuilder<'a> {
    fn new(enc: &'a TextEncoder, visual_tokens: &'a [usize]) -> Self {
        Self { enc, visual_tokens, ids: vec![], labels: vec![], spans: vec![] }
    }

    fn special(&mut self, id: i64, supervised: bool) {
        self.ids.push(id);
        self.labels.push(if supervised { id } else { IGNORE_INDEX });
    }

    fn text(&mut self, text: &str, supervised: bool) {
        for id in self.enc.tokenize(text) {
            self.special(id, supervised);
        }
    }

    fn header(&mut self, role: &str) {
        let s = &self.enc.special;
        self.special(s.start_header.expect("llama3"), false);
        self.text(role, false);
        self.special(s.end_header.expect("llama3"), false);
        self.text("\n\n", false);
    }

    /// Next image's visual tokens, never supervised.
    fn visual(&mut self) -> std::result::Result<(), ImageProblem> {
        let k = self.spans.len();
        let n = *self.visual_tokens.get(k).ok_or_else(|| (BadReason::ImageTokenMismatch, format!("marker {} has no image", k + 1)))?;
        let start = self.ids.len();
        self.ids.extend(std::iter::repeat_n(self.enc.special.image, n));
        self.labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
        self.spans.push(start..start + n);
        Ok(())
    }

    /// Text with image markers: each marker becomes the next image's visual tokens.
    fn content(&mut self, text: &str, supervised: bool) -> std::result::Result<(), ImageProblem> {
        let mut pieces = text.split(self.enc.image_marker.as_str());
        self.text(pieces.next().unwrap_or(""), supervised);
        for piece in pieces {
            self.visual()?;
            self.text(piece, supervised);
        }
        Ok(())
    }

    fn finish(mut self, max_len: usize) -> std::result::Result<TokenizedSample, ImageProblem> {
        if self.spans.len() != self.visual_tokens.len() {
            return Err((BadReason::ImageTokenMismatch, format!("{} marker(s) placed for {} image(s)", self.spans.len(), self.visual_tokens.len())));
        }
        let truncated = self.ids.len() > max_len;
        if truncated {
            if let Some(span) = self.spans.iter().find(|s| s.end > max_len) {
                return Err((
                    BadReason::TooLong,
                    format!("{} tokens > max_len {max_len} and visual tokens {}..{} would be cut", self.ids.len(), span.start, span.end),
                ));
            }
            self.ids.truncate(max_len);
            self.labels.truncate(max_len);
        }
        if self.labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Err((BadReason::TooLong, format!("no supervised token within max_len {max_len}")));
        }
        Ok(TokenizedSample { input_ids: self.ids, labels: self.labels, visual_spans: self.spans, truncated })
    }
}
