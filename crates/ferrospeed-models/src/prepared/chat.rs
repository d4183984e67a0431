//! Chat templates: the Jinja template a tokenizer ships (`tokenizer_config.json`, `chat_template.jinja`,
//! a GGUF file's `tokenizer.chat_template`, or a file given with `--chat-template`) rendered with
//! `minijinja` as transformers' `apply_chat_template` renders it: `trim_blocks` and `lstrip_blocks` on,
//! Python string methods (`.strip()`, `.startswith()`…) through minijinja-contrib's pycompat,
//! `raise_exception`, and `messages`, `add_generation_prompt`, `bos_token`, `eos_token` in the context.
//!
//! Which tokens of a conversation an assistant wrote: a template with `{% generation %}` …
//! `{% endgeneration %}` markers says so itself, as transformers' `return_assistant_tokens_mask` reads
//! them (TRL's training templates have them). Otherwise reply `i` is the text the template adds between
//! the conversation up to the message before it rendered with `add_generation_prompt = true` and the
//! conversation up to the reply itself (its content, the end-of-turn marker and what follows it, e.g.
//! `<|im_end|>\n`): where TRL's ChatML training templates put the markers. Any template that renders
//! conversations incrementally (every common one does) gives these spans; one that does not is refused
//! with a message.

use super::Message;
use minijinja::{Environment, Error, ErrorKind, Value};

/// A chat template ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template marks the assistant's text with `{% generation %}` blocks.
    marked: bool,
}

/// What a `{% generation %}` / `{% endgeneration %}` block leaves in the rendered text (private-use
/// characters, removed again before the text is used).
const GEN_START: char = '\u{F0000}';
const GEN_END: char = '\u{F0001}';

/// `source` with its generation blocks as minijinja statements that write [`GEN_START`] and
/// [`GEN_END`]: `{%- generation -%}` becomes an `if` whose whitespace control is the tag's, so the
/// text around it renders as transformers renders it (the tag itself writes nothing).
fn mark_generation(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut marked = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else { break };
        let inner = &tag[2..close];
        let (left, body) = inner.strip_prefix('-').map_or(("", inner), |b| ("-", b));
        let (body, right) = body.strip_suffix('-').map_or((body, ""), |b| (b, "-"));
        let write = |c: char| format!("{{%{left} if true %}}{{{{ \"{c}\" }}}}{{% endif %}}");
        match body.trim() {
            "generation" => out.push_str(&format!("{}{{% if true {right}%}}", write(GEN_START))),
            "endgeneration" => out.push_str(&format!("{}{{% endif {right}%}}", write(GEN_END))),
            _ => {
                out.push_str(&tag[..close + 2]);
                rest = &tag[close + 2..];
                continue;
            }
        }
        marked = true;
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, marked)
}

/// A rendered conversation and the byte ranges of the assistant's replies in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub assistant: Vec<(usize, usize)>,
}

impl ChatTemplate {
    /// Compile `source`; `bos`/`eos` are the tokenizer's special tokens as text ("" when it has none).
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> { Err(Error::new(ErrorKind::InvalidOperation, msg)) });
        let (source, marked) = mark_generation(source);
        env.add_template_owned("chat", source).map_err(|e| describe(&e))?;
        Ok(Self { env, bos: bos.to_string(), eos: eos.to_string(), marked })
    }

    /// The template's text for `messages`, followed by the assistant's header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        Ok(self.render_marked(messages, add_generation_prompt)?.replace([GEN_START, GEN_END], ""))
    }

    /// [`ChatTemplate::render`] with the generation blocks' marks left in.
    fn render_marked(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| describe(&e))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        };
        tmpl.render(ctx).map_err(|e| describe(&e))
    }

    /// The whole conversation and the spans of its assistant replies.
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered, String> {
        if self.marked {
            let marked = self.render_marked(messages, false)?;
            let (mut text, mut assistant, mut open) = (String::with_capacity(marked.len()), Vec::new(), None);
            for c in marked.chars() {
                match c {
                    GEN_START => open = Some(text.len()),
                    GEN_END => {
                        if let Some(start) = open.take().filter(|&s| s < text.len()) {
                            assistant.push((start, text.len()));
                        }
                    }
                    c => text.push(c),
                }
            }
            return Ok(Rendered { text, assistant });
        }
        let text = self.render(messages, false)?;
        let mut assistant = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&prompt) || !text.starts_with(&upto) {
                return Err(format!(
                    "the chat template does not render conversations incrementally (message {} changes the text before it), so the assistant's tokens cannot be found",
                    i + 1
                ));
            }
            if upto.len() > prompt.len() {
                assistant.push((prompt.len(), upto.len()));
            }
        }
        Ok(Rendered { text, assistant })
    }
}

/// A minijinja error in one line, with the template line when known.
fn describe(e: &Error) -> String {
    let what = e.detail().map_or_else(|| e.kind().to_string(), |d| format!("{}: {d}", e.kind()));
    match e.line() {
        Some(line) => format!("{what} (template line {line})"),
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn assistant_spans_cover_the_reply_and_its_end_of_turn() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let r = t.render_with_spans(&[msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "Bye!")]).unwrap();
        let spans: Vec<&str> = r.assistant.iter().map(|&(a, b)| &r.text[a..b]).collect();
        assert_eq!(spans, vec!["Hello!<|im_end|>\n", "Bye!<|im_end|>\n"]);
    }

    #[test]
    fn generation_blocks_mark_the_replies_and_render_nothing_themselves() {
        // TRL's ChatML training layout: the header outside the block, content and end-of-turn inside;
        // whitespace control and trim_blocks around the tags as transformers applies them.
        let marked = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}\n    {%- generation %}\n    {{- m['content'] + '<|im_end|>\n' }}\n    {%- endgeneration %}\n{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}";
        let conv = [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "Bye!")];
        let t = ChatTemplate::new(marked, "", "<|im_end|>").unwrap();
        let plain = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let r = t.render_with_spans(&conv).unwrap();
        assert_eq!(r.text, plain.render(&conv, false).unwrap());
        let spans: Vec<&str> = r.assistant.iter().map(|&(a, b)| &r.text[a..b]).collect();
        assert_eq!(spans, vec!["Hello!<|im_end|>\n", "Bye!<|im_end|>\n"]);
        assert_eq!(r, plain.render_with_spans(&conv).unwrap(), "the same spans as the incremental rule");
        // Markers elsewhere than the reply: what they enclose is what counts.
        let t = ChatTemplate::new("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}</s>{% endfor %}", "", "").unwrap();
        let r = t.render_with_spans(&conv[..2]).unwrap();
        assert_eq!((r.text.as_str(), r.assistant.clone()), ("<user>Hi</s><assistant>Hello!</s>", vec![(23, 29)]));
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}", "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "  hi ")], false).unwrap(), "HI");
        let e = t.render(&[msg("user", "a"), msg("user", "b")], false).unwrap_err();
        assert!(e.contains("only one message"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
