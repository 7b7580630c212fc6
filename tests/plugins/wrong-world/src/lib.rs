//! A valid component that is not a gocp plugin: it exports something else.

wit_bindgen::generate!({
    inline: "package test:other; world other { export hello: func() -> string; }",
});

struct Other;

impl Guest for Other {
    fn hello() -> String {
        "not a cache".into()
    }
}

export!(Other);
