//! `named_enum!`: an enum whose written form (TOML, messages, JSON) is a fixed set of strings.

/// Generates, for an enum whose TOML form is a fixed set of strings, the list of names, the conversions
/// both ways, `Display` and `Serialize`, so the schema, messages and JSON dump share one spelling.
#[macro_export]
#[doc(hidden)]
macro_rules! named_enum {
    ($ty:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every accepted spelling, in the order shown in error messages.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The variant spelled `name` in TOML, if any.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some($ty::$variant),)+
                    _ => None,
                }
            }

            /// The TOML spelling of this variant.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }
    };
}

