//! The rows of the remote part: each GOCACHEPROG helper with the kind of
//! server it is measured against, and the builtin cache as the reference;
//! for each, how to start its server empty (told the proxy port its clients
//! will come through), and the GOCACHEPROG value that points the helper at
//! that server through that port, with a given local directory, and the
//! credentials it reads from the go command's environment.
//!
//! It never measures, never runs a helper itself (the go command does), and
//! never decides what a figure means. Flags are those each helper's `--help`
//! gives for the commits in ../shared/peers/SOURCES.md.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::peers::Peers;
use crate::servers::{
    self, AZURE_ACCOUNT, AZURE_CONTAINER, AZURE_KEY, GCS_BUCKET, GCS_TOKEN, S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY,
    Server,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Helper {
    /// The go command's own cache, no GOCACHEPROG: the reference.
    Builtin,
    GocpS3,
    GocpRedis,
    GocpHttp,
    GocpGcs,
    GocpAzure,
    /// platacard/cacheprog on versitygw.
    Cacheprog,
    /// bradfitz go-cacher with gocached.
    GoCacher,
    /// yonesko/gocacheprog on Redis.
    Yonesko,
    /// tailscale/go-cache-plugin on versitygw.
    GoCachePlugin,
}

pub const ALL: [Helper; 10] = [
    Helper::Builtin,
    Helper::GocpS3,
    Helper::GocpRedis,
    Helper::GocpHttp,
    Helper::GocpGcs,
    Helper::GocpAzure,
    Helper::Cacheprog,
    Helper::GoCacher,
    Helper::Yonesko,
    Helper::GoCachePlugin,
];

/// What the rows need to know about this run.
pub struct Ctx<'a> {
    pub host: &'a Path,
    pub peers: &'a Peers,
    /// A state directory holding only `compiled/` (the remote plugins
    /// compiled), copied into every gocp local directory.
    pub compiled_seed: &'a Path,
}

/// The variables the gcs and azure plugins read their credentials from.
pub const GCS_TOKEN_VAR: &str = "GOCP_BENCH_GCS_TOKEN";
pub const AZURE_KEY_VAR: &str = "GOCP_BENCH_AZURE_KEY";

/// The environment every helper's go command gets: versitygw's credentials
/// for the helpers on S3, an access token for the gcs plugin (the simplest
/// credentials it takes; fake-gcs-server checks none) and Azurite's account
/// key for the azure plugin (gocp is granted each with --allow-env), and no
/// AWS configuration of the user's.
pub const ENV: &[(&str, &str)] = &[
    (GCS_TOKEN_VAR, GCS_TOKEN),
    (AZURE_KEY_VAR, AZURE_KEY),
    ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
    ("AWS_REGION", "us-east-1"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

impl Helper {
    /// As `--helper` spells it.
    pub fn id(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_string()).unwrap_or_default()
    }

    pub fn label(self) -> &'static str {
        match self {
            Helper::Builtin => "builtin cache (no GOCACHEPROG), local only",
            Helper::GocpS3 => "gocp s3, versitygw",
            Helper::GocpRedis => "gocp redis, Redis 7.0",
            Helper::GocpHttp => "gocp http, bazel-remote (`--disable_http_ac_validation`)",
            Helper::GocpGcs => "gocp gcs, fake-gcs-server",
            Helper::GocpAzure => "gocp azure, Azurite",
            Helper::Cacheprog => "platacard/cacheprog, s3 on versitygw",
            Helper::GoCacher => "bradfitz go-cacher + gocached",
            Helper::Yonesko => "yonesko/gocacheprog, Redis 7.0",
            Helper::GoCachePlugin => "tailscale/go-cache-plugin, s3 on versitygw",
        }
    }

    pub fn is_gocp(self) -> bool {
        matches!(self, Helper::GocpS3 | Helper::GocpRedis | Helper::GocpHttp | Helper::GocpGcs | Helper::GocpAzure)
    }

    /// The peer executable this row runs, if it is a peer.
    fn peer_exe(self) -> Option<&'static str> {
        match self {
            Helper::Cacheprog => Some("cacheprog"),
            Helper::GoCacher => Some("go-cacher"),
            Helper::Yonesko => Some("yonesko-gocacheprog"),
            Helper::GoCachePlugin => Some("go-cache-plugin"),
            _ => None,
        }
    }

    fn bazel_remote(ctx: &Ctx) -> Result<PathBuf> {
        servers::tool("bazel-remote", "bazel-remote").or_else(|e| {
            ctx.peers.exe("bazel-remote").with_context(|| format!("{e:#}; nor was it built from ../shared/peers"))
        })
    }

    /// Why this row cannot run here, if it cannot.
    pub fn missing(self, ctx: &Ctx) -> Option<String> {
        let check = || -> Result<()> {
            if let Some(exe) = self.peer_exe() {
                if let Some(why) = ctx.peers.absent() {
                    bail!("{why}");
                }
                ctx.peers.exe(exe).with_context(|| format!("{exe} was not built"))?;
            }
            match self {
                Helper::GocpS3 | Helper::Cacheprog | Helper::GoCachePlugin => {
                    servers::tool("versitygw", "versitygw")?;
                }
                Helper::GocpRedis | Helper::Yonesko => {
                    servers::tool("redis-server", "redis")?;
                }
                Helper::GocpHttp => {
                    Helper::bazel_remote(ctx)?;
                }
                Helper::GocpGcs => {
                    servers::tool("fake-gcs-server", "fake-gcs-server")?;
                }
                Helper::GocpAzure => {
                    servers::tool("azurite-blob", "azurite")?;
                }
                Helper::GoCacher => {
                    ctx.peers.exe("gocached").context("gocached was not built")?;
                }
                Helper::Builtin => {}
            }
            Ok(())
        };
        check().err().map(|e| format!("{e:#}"))
    }

    /// Starts this row's server, empty, with its data under `dir`; its
    /// clients will reach it through 127.0.0.1:`public_port` (the proxy,
    /// made after it), which fake-gcs-server must know.
    pub fn start_server(self, ctx: &Ctx, dir: &Path, public_port: u16) -> Result<Option<Server>> {
        Ok(Some(match self {
            Helper::Builtin => return Ok(None),
            Helper::GocpS3 | Helper::Cacheprog | Helper::GoCachePlugin => servers::versitygw(dir)?,
            Helper::GocpRedis | Helper::Yonesko => servers::redis(dir)?,
            Helper::GocpHttp => servers::bazel_remote(&Helper::bazel_remote(ctx)?, dir)?,
            Helper::GocpGcs => servers::fake_gcs(dir, public_port)?,
            Helper::GocpAzure => servers::azurite(dir)?,
            Helper::GoCacher => servers::gocached(&ctx.peers.exe("gocached").context("gocached")?, dir)?,
        }))
    }

    /// GOCACHEPROG for this helper with its local directory `local` (made
    /// here: empty, but for gocp's compiled plugins), talking to the server
    /// through 127.0.0.1:`port`; gocp writes its figures to `stats`. `None`
    /// for the builtin cache.
    pub fn gocacheprog(self, ctx: &Ctx, local: &Path, port: u16, stats: &Path) -> Result<Option<String>> {
        fs::create_dir_all(local)?;
        let l = local.display();
        let peer = |exe: &str| ctx.peers.exe(exe).with_context(|| format!("{exe} was not built"));
        let gocp = |plugin: &str| -> Result<String> {
            crate::copy_dir(&ctx.compiled_seed.join("compiled"), &local.join("compiled"))?;
            Ok(format!("{} --dir {l} --stats-json {} --plugin {plugin}", ctx.host.display(), stats.display()))
        };
        let addr = format!("127.0.0.1:{port}");
        let prog = match self {
            Helper::Builtin => return Ok(None),
            Helper::GocpS3 => format!(
                "{} --config bucket={S3_BUCKET} --config endpoint=http://{addr} --allow-net {addr} \
                 --allow-env AWS_ACCESS_KEY_ID --allow-env AWS_SECRET_ACCESS_KEY",
                gocp("s3")?
            ),
            Helper::GocpRedis => format!("{} --config url=redis://{addr} --allow-net {addr}", gocp("redis")?),
            Helper::GocpHttp => format!("{} --config url=http://{addr} --allow-net {addr}", gocp("http")?),
            Helper::GocpGcs => format!(
                "{} --config bucket={GCS_BUCKET} --config endpoint=http://{addr} --config token-env={GCS_TOKEN_VAR} \
                 --allow-net {addr} --allow-env {GCS_TOKEN_VAR}",
                gocp("gcs")?
            ),
            // Azurite names the account in the path, not in the host name.
            Helper::GocpAzure => format!(
                "{} --config account={AZURE_ACCOUNT} --config container={AZURE_CONTAINER} \
                 --config endpoint=http://{addr}/{AZURE_ACCOUNT} --config key-env={AZURE_KEY_VAR} \
                 --allow-net {addr} --allow-env {AZURE_KEY_VAR}",
                gocp("azure")?
            ),
            Helper::Cacheprog => format!(
                "{} --log-level ERROR direct --root-directory {l} --remote-storage-type s3 \
                 --s3-endpoint http://{addr} --s3-force-path-style --s3-region us-east-1 --s3-bucket {S3_BUCKET} \
                 --s3-access-key-id {S3_ACCESS_KEY} --s3-access-key-secret {S3_SECRET_KEY}",
                peer("cacheprog")?.display()
            ),
            Helper::GoCacher => {
                format!("{} -cache-dir {l} -cache-server http://{addr}", peer("go-cacher")?.display())
            }
            Helper::Yonesko => format!("{} -dir {l} -r-urls {addr}", peer("yonesko-gocacheprog")?.display()),
            Helper::GoCachePlugin => format!(
                "{} --cache-dir {l} --bucket {S3_BUCKET} --region us-east-1 --s3-endpoint-url http://{addr} \
                 --s3-path-style",
                peer("go-cache-plugin")?.display()
            ),
        };
        // The go command splits GOCACHEPROG at white space (quotes aside).
        if let Some(p) =
            [ctx.host, local, stats].into_iter().find(|p| p.to_string_lossy().contains(char::is_whitespace))
        {
            bail!("{} holds white space, which GOCACHEPROG would split", p.display());
        }
        Ok(Some(prog))
    }
}
