//! Rules for queue and kind names, shared by the broker's validation and the SDK.

/// Longest queue or kind name, in characters.
pub const MAX_NAME_LEN: usize = 128;

/// Why a queue or kind name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    TooLong,
    /// The name has a character outside `[A-Za-z0-9._:-]`.
    BadCharacter(char),
}

impl std::fmt::Display for NameError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameError::Empty => write!(formatter, "must not be empty"),
            NameError::TooLong => write!(formatter, "must be at most {MAX_NAME_LEN} characters"),
            NameError::BadCharacter(character) => {
                write!(formatter, "has {character:?}; allowed are [A-Za-z0-9._:-]")
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Checks a queue or kind name: 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    match name
        .chars()
        .find(|character| !(character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | ':' | '-')))
    {
        Some(bad) => Err(NameError::BadCharacter(bad)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        assert_eq!(validate_name("emails.send:v2-high_prio"), Ok(()));
        assert_eq!(validate_name(&"q".repeat(MAX_NAME_LEN)), Ok(()));
    }

    #[test]
    fn refuses_empty_long_and_foreign_characters() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"q".repeat(MAX_NAME_LEN + 1)), Err(NameError::TooLong));
        assert_eq!(validate_name("a b"), Err(NameError::BadCharacter(' ')));
        assert_eq!(validate_name("jobs/1"), Err(NameError::BadCharacter('/')));
        assert_eq!(validate_name("é"), Err(NameError::BadCharacter('é')));
    }
}
