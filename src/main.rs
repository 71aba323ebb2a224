//! The `meridian` command: run a node, the local three-region dev mesh, or mint tokens.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meridian::auth::{generate_ed25519_pem, Role, TokenSigner};
use meridian::config::NodeConfig;
use meridian::ids::{SessionId, UserId};
use meridian::node::Node;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Edge-distributed WebRTC SFU for compliance video"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a region file (see regions/).
    Serve {
        /// Region configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the India, Europe and US nodes on localhost with demo links.
    Dev,
    /// Mint a session access token.
    Token {
        /// Region file whose auth section (HS256 secret, issuer, audience) signs the token.
        #[arg(long, short, default_value = "regions/india.toml")]
        config: PathBuf,
        /// Sign with this Ed25519 private key (PEM) instead of the config's HS256 secret.
        #[arg(long)]
        eddsa_key: Option<PathBuf>,
        #[arg(long)]
        session: SessionId,
        #[arg(long)]
        user: UserId,
        #[arg(long, value_parser = parse_role, default_value = "user")]
        role: Role,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Write a new Ed25519 key pair for EdDSA tokens.
    Keygen {
        /// Private key output (PEM, PKCS#8).
        #[arg(long)]
        private: PathBuf,
        /// Public key output (PEM, SPKI): point auth.public_key_file at it.
        #[arg(long)]
        public: PathBuf,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "user" => Ok(Role::User),
        "agent" => Ok(Role::Agent),
        "observer" => Ok(Role::Observer),
        _ => Err(format!("unknown role {s:?}: use user, agent or observer")),
    }
}

const DEV_REGIONS: [&str; 3] = [
    include_str!("../regions/india.toml"),
    include_str!("../regions/europe.toml"),
    include_str!("../regions/us.toml"),
];

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rtc=warn,webrtc=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve { config } => {
                let cfg = NodeConfig::load(&config)?;
                let node = Node::start(cfg).await?;
                println!("meridian {} listening on {}", node.region, node.http_url());
                tokio::select! {
                    _ = node.wait() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Command::Dev => dev().await?,
            Command::Token {
                config,
                eddsa_key,
                session,
                user,
                role,
                ttl,
            } => {
                let cfg = NodeConfig::load(&config)?;
                let signer = match eddsa_key {
                    Some(path) => TokenSigner::eddsa_pem(
                        &std::fs::read(&path)?,
                        &cfg.auth.issuer,
                        &cfg.auth.audience,
                    )?,
                    None => TokenSigner::from_config(&cfg.auth)?,
                };
                println!(
                    "{}",
                    signer.mint(&session, &user, role, Duration::from_secs(ttl))?
                );
            }
            Command::Keygen { private, public } => {
                let (sk, pk) = generate_ed25519_pem();
                std::fs::write(&private, sk)?;
                std::fs::write(&public, pk)?;
                println!("wrote {} and {}", private.display(), public.display());
            }
        }
        Ok(())
    })
}

async fn dev() -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    for text in DEV_REGIONS {
        let cfg = NodeConfig::from_toml_str(text)?;
        let signer = TokenSigner::from_config(&cfg.auth)?;
        let node = Node::start(cfg).await?;
        nodes.push((node, signer));
    }
    let session: SessionId = "demo-kyc".parse()?;
    let day = Duration::from_secs(24 * 3600);
    println!("\nMeridian dev mesh is up (each region runs as its own node).\n");
    for (node, signer) in &nodes {
        let user = signer.mint(&session, &"demo-user".parse()?, Role::User, day)?;
        let agent = signer.mint(&session, &"demo-agent".parse()?, Role::Agent, day)?;
        println!("  {:<7} {}", node.region, node.http_url());
        println!(
            "          user page:  {}/demo/user.html#token={user}",
            node.http_url()
        );
        println!(
            "          agent page: {}/demo/agent.html#token={agent}",
            node.http_url()
        );
    }
    println!("\nOpen a user page and an agent page of the same region in two browser windows.");
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
