//! Chat templates: the Jinja template a tokenizer ships (`tokenizer_config.json`, `chat_template.jinja`,
//! a GGUF file's `tokenizer.chat_template`, or a file given with `--chat-template`) rendered with
//! `minijinja` as transformers' `apply_chat_template` renders it: `trim_blocks` and `lstrip_blocks` on,
//! Python string methods (`.strip()`, `.startswith()`…) through minijinja-contrib's pycompat,
//! `raise_exception`, and `messages`, `add_generation_prompt`, `bos_token`, `eos_token` in the context.
//!
//! Which tokens of a conversation an assistant wrote: its reply `i` is the text the template adds
//! between the conversation up to the message before it rendered with `add_generation_prompt = true` and
//! the conversation up to the reply itself (its content and the template's end-of-turn marker). Any
//! template that renders conversations incrementally (every common one does) gives these spans; one that
//! does not is refused with a message.

use super::Message;
use minijinja::{Environment, Error, ErrorKind, Value};

/// A chat template ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
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
        env.add_template_owned("chat", source.to_string()).map_err(|e| describe(&e))?;
        Ok(Self { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// The template's text for `messages`, followed by the assistant's header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
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
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}", "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "  hi ")], false).unwrap(), "HI");
        let e = t.render(&[msg("user", "a"), msg("user", "b")], false).unwrap_err();
        assert!(e.contains("only one message"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
