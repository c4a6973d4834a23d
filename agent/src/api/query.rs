//! Query strings of kubelet API requests (pure): one parser for every endpoint, on the url
//! crate's `form_urlencoded` (the `application/x-www-form-urlencoded` rules Go's
//! `url.ParseQuery` follows too): pairs split on `&`, key and value on the first `=`, `+` is a
//! space, `%XX` is a byte, an invalid escape stays as it is, invalid UTF-8 becomes U+FFFD.

/// The decoded `key=value` pairs of a query string, in order, repeated keys kept
/// (`command=sh&command=-c`); empty pairs are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses the query part of a URI (without the `?`).
    pub fn parse(q: &str) -> Self {
        Query(
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// Every pair, in order, owned.
    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.0
    }

    /// Every pair, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// The value of a single-valued key: the last one when the key is repeated, as before the
    /// parsers were merged (Go's `Query().Get` takes the first; no client sends these twice).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean flag: true for `1` and `true` in any case the kubelet's clients write
    /// (`true`, `True`, `TRUE`).
    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "True" | "TRUE"))
    }
}

/// Decodes one query component the same way ([`Query::parse`] does it for every pair).
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        let cases: [(&str, &[(&str, &str)]); 9] = [
            // `+` is a space, `%2B` a plus.
            ("a=x+y", &[("a", "x y")]),
            ("a=x%2By", &[("a", "x+y")]),
            // Keys are decoded too (one parser used to leave them as they came).
            ("tail%4Cines=3", &[("tailLines", "3")]),
            // Repeated keys are kept, in order.
            ("command=a&command=b", &[("command", "a"), ("command", "b")]),
            // Bad or cut escapes stay as they are.
            ("a=%zz%4", &[("a", "%zz%4")]),
            ("a=100%", &[("a", "100%")]),
            // `%+1` is not an escape (a sign before the hex digits used to be accepted).
            ("a=%+1", &[("a", "% 1")]),
            // Empty pairs are skipped, a key alone has an empty value, `=` splits once.
            ("&&stdin&a=b=c&", &[("stdin", ""), ("a", "b=c")]),
            // Invalid UTF-8 is replaced, never an error.
            ("a=%ff", &[("a", "\u{fffd}")]),
        ];
        for (q, want) in cases {
            let got = Query::parse(q);
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect();
            assert_eq!(got.pairs(), want.as_slice(), "{q}");
            // One component decodes as it does inside a query.
            if let [(_, v)] = want.as_slice() {
                if let Some((_, raw)) = q.split_once('=').filter(|_| !q.contains('&')) {
                    assert_eq!(&decode(raw), v, "{q}");
                }
            }
        }
    }

    #[test]
    fn lookups() {
        let q = Query::parse("command=sh&command=-c&stdin=1&tty=0&follow=True&x=1&x=2");
        assert_eq!(q.all("command").collect::<Vec<_>>(), ["sh", "-c"]);
        assert_eq!(q.get("x"), Some("2"));
        assert_eq!(q.get("nope"), None);
        assert!(q.flag("stdin") && q.flag("follow"));
        assert!(!q.flag("tty") && !q.flag("nope"));
    }
}
