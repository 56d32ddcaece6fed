//! `petrel passwd`: add, change and remove password-file entries, as `mosquitto_passwd` does.
//!
//! ```text
//! petrel passwd [-c] FILE USERNAME            # prompts twice on the terminal
//! petrel passwd [-c] -b FILE USERNAME PASSWORD
//! petrel passwd -D FILE USERNAME
//! ```

use std::path::PathBuf;

use super::{AuthError, PasswordFile};

/// Arguments of `petrel passwd`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct PasswdArgs {
    /// Create the password file, replacing any existing one.
    #[arg(short = 'c', long = "create")]
    pub create: bool,
    /// Take the password from the command line instead of prompting (it may then be visible
    /// to other users of the machine and kept in shell history).
    #[arg(short = 'b', long = "batch", requires = "password")]
    pub batch: bool,
    /// Delete USERNAME from the file.
    #[arg(short = 'D', long = "delete", conflicts_with_all = ["create", "batch"])]
    pub delete: bool,
    /// The password file.
    pub file: PathBuf,
    /// The user to add, change or delete.
    pub username: String,
    /// The password, with -b only.
    #[arg(requires = "batch")]
    pub password: Option<String>,
}

/// Runs `petrel passwd`, prompting on the terminal when no password is given.
pub fn run(args: PasswdArgs) -> Result<(), AuthError> {
    run_with(args, &mut |prompt| rpassword::prompt_password(prompt))
}

/// [`run`] with the password prompt supplied by the caller.
fn run_with(
    args: PasswdArgs,
    prompt: &mut dyn FnMut(&str) -> std::io::Result<String>,
) -> Result<(), AuthError> {
    if args.delete {
        let mut file = PasswordFile::load(&args.file)?;
        if !file.remove(&args.username) {
            return Err(AuthError::UnknownUser {
                username: args.username,
                path: args.file,
            });
        }
        return file.save(&args.file);
    }
    super::password::validate_username(&args.username)?;
    let mut file = if args.create {
        PasswordFile::default()
    } else {
        PasswordFile::load(&args.file)?
    };
    let password = match args.password {
        Some(password) => password,
        None => ask_twice(prompt)?,
    };
    if password.is_empty() {
        return Err(AuthError::BadPassword("the password is empty"));
    }
    file.set(&args.username, password.as_bytes())?;
    file.save(&args.file)
}

fn ask_twice(prompt: &mut dyn FnMut(&str) -> std::io::Result<String>) -> Result<String, AuthError> {
    let first = prompt("Password: ").map_err(AuthError::Prompt)?;
    let second = prompt("Reenter password: ").map_err(AuthError::Prompt)?;
    if first != second {
        return Err(AuthError::BadPassword("the passwords do not match"));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: PasswdArgs,
    }

    fn parse(argv: &[&str]) -> Result<PasswdArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("passwd").chain(argv.iter().copied()))
            .map(|cli| cli.args)
    }

    fn no_prompt(_: &str) -> std::io::Result<String> {
        panic!("unexpected prompt")
    }

    #[test]
    fn command_line_forms() {
        let args = parse(&["-c", "pw", "alice"]).expect("create");
        assert!(args.create && !args.batch && !args.delete);
        assert_eq!(
            (args.file.to_str(), args.username.as_str(), args.password),
            (Some("pw"), "alice", None)
        );
        let args = parse(&["-b", "pw", "alice", "secret"]).expect("batch");
        assert_eq!(args.password.as_deref(), Some("secret"));
        assert!(
            parse(&["-c", "-b", "pw", "alice", "secret"])
                .expect("create batch")
                .create
        );
        assert!(parse(&["-D", "pw", "alice"]).expect("delete").delete);
        for bad in [
            &["pw", "alice", "secret"][..],
            &["-b", "pw", "alice"],
            &["-D", "-c", "pw", "alice"],
            &["-D", "-b", "pw", "alice", "x"],
            &["pw"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_change_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        let p = path.to_str().expect("utf-8 path");

        let err = run_with(
            parse(&["-b", p, "alice", "one"]).expect("args"),
            &mut no_prompt,
        )
        .expect_err("no file yet");
        assert!(err.to_string().starts_with("read password file"), "{err}");

        run_with(
            parse(&["-c", "-b", p, "alice", "one"]).expect("args"),
            &mut no_prompt,
        )
        .expect("create");
        let mut answers = vec!["two".to_string(), "two".to_string()].into_iter();
        let mut prompt = |_: &str| Ok(answers.next().expect("asked twice only"));
        run_with(parse(&[p, "bob"]).expect("args"), &mut prompt).expect("add bob");
        let file = PasswordFile::load(&path).expect("load");
        assert!(file.verify("alice", b"one") && file.verify("bob", b"two"));

        run_with(parse(&["-D", p, "alice"]).expect("args"), &mut no_prompt).expect("delete");
        let err =
            run_with(parse(&["-D", p, "alice"]).expect("args"), &mut no_prompt).expect_err("gone");
        assert!(matches!(err, AuthError::UnknownUser { .. }), "{err}");
        let file = PasswordFile::load(&path).expect("load");
        assert!(!file.contains("alice") && file.contains("bob"));

        run_with(
            parse(&["-c", "-b", p, "carol", "three"]).expect("args"),
            &mut no_prompt,
        )
        .expect("recreate");
        let file = PasswordFile::load(&path).expect("load");
        assert!(
            !file.contains("bob") && file.contains("carol"),
            "-c replaces the file"
        );
    }

    #[test]
    fn bad_input_is_refused_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        let p = path.to_str().expect("utf-8 path");
        let mut mismatch = {
            let mut answers = vec!["a".to_string(), "b".to_string()].into_iter();
            move |_: &str| Ok(answers.next().expect("two answers"))
        };
        let err = run_with(parse(&["-c", p, "alice"]).expect("args"), &mut mismatch)
            .expect_err("mismatch");
        assert_eq!(err.to_string(), "read password: the passwords do not match");
        let err = run_with(
            parse(&["-c", "-b", p, "alice", ""]).expect("args"),
            &mut no_prompt,
        )
        .expect_err("empty");
        assert!(matches!(err, AuthError::BadPassword(_)), "{err}");
        let err = run_with(
            parse(&["-c", "-b", p, "a:b", "x"]).expect("args"),
            &mut no_prompt,
        )
        .expect_err("colon");
        assert!(matches!(err, AuthError::InvalidUsername { .. }), "{err}");
        let mut failing = |_: &str| Err(std::io::Error::other("no tty"));
        let err =
            run_with(parse(&["-c", p, "alice"]).expect("args"), &mut failing).expect_err("no tty");
        assert!(matches!(err, AuthError::Prompt(_)), "{err}");
        assert!(!path.exists(), "nothing written");
    }
}
