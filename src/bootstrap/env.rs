//! Who am I in the job: rank, world size and the rendezvous address, read from
//! the variables a launcher sets (torchrun, OpenMPI's mpirun, a PMI launcher
//! such as MPICH/Hydra, or Slurm's srun), so ranks that are separate processes
//! can find each other without linking a launcher library.

use crate::error::{Error, Result};

/// Rendezvous host used when `MASTER_ADDR` is not set: one-host jobs need nothing.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// Rendezvous port used when `MASTER_PORT` is not set (torchrun's default too).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher's variables a [`LaunchEnv`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Launcher {
    /// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (torchrun and friends).
    Torchrun,
    /// `OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}` (OpenMPI's mpirun).
    OpenMpi,
    /// `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS` (MPICH/Intel MPI via PMI).
    Pmi,
    /// `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` (srun).
    Slurm,
}

/// The variable names of one launcher, in the order rank, world, local rank, local world.
struct Flavor {
    launcher: Launcher,
    rank: &'static str,
    world: &'static str,
    local_rank: &'static str,
    local_world: &'static str,
}

/// Highest priority first: a job started by torchrun inside an srun step sees both sets.
const FLAVORS: [Flavor; 4] = [
    Flavor {
        launcher: Launcher::Torchrun,
        rank: "RANK",
        world: "WORLD_SIZE",
        local_rank: "LOCAL_RANK",
        local_world: "LOCAL_WORLD_SIZE",
    },
    Flavor {
        launcher: Launcher::OpenMpi,
        rank: "OMPI_COMM_WORLD_RANK",
        world: "OMPI_COMM_WORLD_SIZE",
        local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
        local_world: "OMPI_COMM_WORLD_LOCAL_SIZE",
    },
    Flavor {
        launcher: Launcher::Pmi,
        rank: "PMI_RANK",
        world: "PMI_SIZE",
        local_rank: "MPI_LOCALRANKID",
        local_world: "MPI_LOCALNRANKS",
    },
    Flavor {
        launcher: Launcher::Slurm,
        rank: "SLURM_PROCID",
        world: "SLURM_NTASKS",
        local_rank: "SLURM_LOCALID",
        local_world: "SLURM_NTASKS_PER_NODE",
    },
];

/// This process's place in a multi-process job, as its launcher described it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LaunchEnv {
    /// Global rank, in `0..world_size`.
    pub rank: usize,
    /// Number of ranks in the job (at least 1).
    pub world_size: usize,
    /// Rank among the processes of this host, when the launcher says.
    pub local_rank: Option<usize>,
    /// Number of processes on this host, when the launcher says.
    pub local_world_size: Option<usize>,
    /// Host of rank 0's rendezvous listener: `MASTER_ADDR`, default [`DEFAULT_MASTER_ADDR`].
    pub master_addr: String,
    /// Port of rank 0's rendezvous listener: `MASTER_PORT`, default [`DEFAULT_MASTER_PORT`].
    pub master_port: u16,
    /// Which launcher's variables were used.
    pub launcher: Launcher,
}

impl LaunchEnv {
    /// Read the process environment; see [`LaunchEnv::from_lookup`].
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Read the launcher variables through `lookup` (a variable name to its value).
    ///
    /// The first launcher (torchrun, OpenMPI, PMI, Slurm, in this order) whose rank or
    /// world-size variable is set wins; then both must be set. Local rank and local world
    /// size are optional. `MASTER_ADDR` defaults to `127.0.0.1` and `MASTER_PORT` to 29500
    /// whichever launcher is used, so a multi-host job must set `MASTER_ADDR` itself.
    /// Returns `Ok(None)` when no launcher's rank or world-size variable is set (a
    /// single-process run), and `InvalidArgument` naming the variable and its value when
    /// a value is not a number, or is out of range, or when the set is partial.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(flavor) = FLAVORS.iter().find(|f| lookup(f.rank).is_some() || lookup(f.world).is_some()) else {
            return Ok(None);
        };
        let required = |name: &'static str, other: &'static str| -> Result<usize> {
            let value = lookup(name).ok_or_else(|| Error::InvalidArgument {
                arg: name.into(),
                reason: format!("not set, but {other} is (the {:?} launcher variables must come together)", flavor.launcher),
            })?;
            parse_count(name, &value, false)
        };
        let rank = required(flavor.rank, flavor.world)?;
        let world_size = required(flavor.world, flavor.rank)?;
        // Slurm writes SLURM_NTASKS_PER_NODE as "4(x2)": the first node's count comes first.
        let leading = flavor.launcher == Launcher::Slurm;
        let local_rank = lookup(flavor.local_rank).map(|v| parse_count(flavor.local_rank, &v, false)).transpose()?;
        let local_world_size = lookup(flavor.local_world).map(|v| parse_count(flavor.local_world, &v, leading)).transpose()?;

        let bad = |arg: &'static str, value: usize, reason: String| Error::InvalidArgument {
            arg: arg.into(),
            reason: format!("{value}: {reason}"),
        };
        if world_size == 0 {
            return Err(bad(flavor.world, world_size, "a job has at least one rank".into()));
        }
        if rank >= world_size {
            return Err(bad(flavor.rank, rank, format!("must be below {} = {world_size}", flavor.world)));
        }
        if let Some(lw) = local_world_size {
            if lw == 0 || lw > world_size {
                return Err(bad(flavor.local_world, lw, format!("must be in 1..={world_size} ({})", flavor.world)));
            }
            if let Some(lr) = local_rank.filter(|&lr| lr >= lw) {
                return Err(bad(flavor.local_rank, lr, format!("must be below {} = {lw}", flavor.local_world)));
            }
        } else if let Some(lr) = local_rank.filter(|&lr| lr >= world_size) {
            return Err(bad(flavor.local_rank, lr, format!("must be below {} = {world_size}", flavor.world)));
        }

        let master_addr = lookup("MASTER_ADDR").unwrap_or_else(|| DEFAULT_MASTER_ADDR.to_string());
        if master_addr.trim().is_empty() {
            return Err(Error::InvalidArgument { arg: "MASTER_ADDR".into(), reason: "is set but empty".into() });
        }
        let master_port = match lookup("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    let reason = format!("`{v}` is not a TCP port in 1..=65535");
                    return Err(Error::InvalidArgument { arg: "MASTER_PORT".into(), reason });
                }
            },
        };
        Ok(Some(Self { rank, world_size, local_rank, local_world_size, master_addr, master_port, launcher: flavor.launcher }))
    }

    /// `master_addr:master_port`, bracketing an IPv6 literal, ready for `ToSocketAddrs`.
    pub fn master_endpoint(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// A non-negative integer, or (with `leading`) the digits that start the value.
fn parse_count(name: &'static str, value: &str, leading: bool) -> Result<usize> {
    let digits = if leading { value.split(|c: char| !c.is_ascii_digit()).next().unwrap_or("") } else { value };
    digits
        .parse::<usize>()
        .map_err(|_| Error::InvalidArgument { arg: name.into(), reason: format!("`{value}` is not a non-negative integer") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LaunchEnv::from_lookup(|name| map.get(name).cloned())
    }

    /// The variable a rejection names, and its reason.
    fn rejection(vars: &[(&str, &str)]) -> (String, String) {
        match read(vars) {
            Err(Error::InvalidArgument { arg, reason }) => (arg, reason),
            other => panic!("expected InvalidArgument for {vars:?}, got {other:?}"),
        }
    }

    #[test]
    fn no_launcher_variables_means_a_single_process_run() {
        assert_eq!(read(&[]).unwrap(), None);
        // Local and rendezvous variables alone do not make a launcher.
        assert_eq!(read(&[("LOCAL_RANK", "0"), ("MASTER_ADDR", "10.0.0.1"), ("SLURM_LOCALID", "0")]).unwrap(), None);
    }

    #[test]
    fn each_launcher_flavor_is_read_with_documented_defaults() {
        let t = read(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")]).unwrap().unwrap();
        let want = LaunchEnv {
            rank: 3,
            world_size: 8,
            local_rank: Some(1),
            local_world_size: Some(2),
            master_addr: DEFAULT_MASTER_ADDR.into(),
            master_port: DEFAULT_MASTER_PORT,
            launcher: Launcher::Torchrun,
        };
        assert_eq!(t, want);

        let o = read(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]);
        let o = o.unwrap().unwrap();
        assert_eq!(
            (o.launcher, o.rank, o.world_size, o.local_rank, o.local_world_size),
            (Launcher::OpenMpi, 1, 4, Some(1), None)
        );

        let p =
            read(&[("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "0"), ("MPI_LOCALNRANKS", "2")]).unwrap().unwrap();
        assert_eq!((p.launcher, p.rank, p.world_size, p.local_rank, p.local_world_size), (Launcher::Pmi, 0, 2, Some(0), Some(2)));

        let vars = [("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("SLURM_NTASKS_PER_NODE", "4(x2)")];
        let s = read(&vars).unwrap().unwrap();
        assert_eq!(
            (s.launcher, s.rank, s.world_size, s.local_rank, s.local_world_size),
            (Launcher::Slurm, 5, 8, Some(1), Some(4))
        );

        let m = read(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "1234")]).unwrap().unwrap();
        assert_eq!((m.master_addr.as_str(), m.master_port, m.master_endpoint()), ("node7", 1234, "node7:1234".to_string()));
        let v6 = read(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "::1")]).unwrap().unwrap();
        assert_eq!(v6.master_endpoint(), "[::1]:29500");
    }

    #[test]
    fn torchrun_wins_over_mpi_which_wins_over_pmi_which_wins_over_slurm() {
        let all = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
            ("SLURM_PROCID", "4"),
            ("SLURM_NTASKS", "5"),
        ];
        let expect = [(Launcher::Torchrun, 1), (Launcher::OpenMpi, 2), (Launcher::Pmi, 3), (Launcher::Slurm, 4)];
        for (skip, (launcher, rank)) in expect.into_iter().enumerate() {
            let got = read(&all[2 * skip..]).unwrap().unwrap();
            assert_eq!((got.launcher, got.rank, got.world_size), (launcher, rank, rank + 1));
        }
    }

    /// Variables set, the variable the rejection must name, and a piece of its reason.
    type Case = (&'static [(&'static str, &'static str)], &'static str, &'static str);

    #[test]
    fn bad_values_are_rejected_naming_the_variable_and_value() {
        let cases: [Case; 11] = [
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK", "`x`"),
            (&[("RANK", "-1"), ("WORLD_SIZE", "2")], "RANK", "`-1`"),
            (&[("RANK", "0"), ("WORLD_SIZE", "")], "WORLD_SIZE", "``"),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE", "0: "),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK", "2: must be below WORLD_SIZE = 2"),
            (&[("RANK", "1")], "WORLD_SIZE", "not set, but RANK is"),
            (&[("OMPI_COMM_WORLD_SIZE", "4")], "OMPI_COMM_WORLD_RANK", "not set"),
            (
                &[("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "2")],
                "MPI_LOCALRANKID",
                "2: ",
            ),
            (
                &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_NTASKS_PER_NODE", "(x2)")],
                "SLURM_NTASKS_PER_NODE",
                "`(x2)`",
            ),
            (&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")], "MASTER_PORT", "`70000`"),
            (&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "")], "MASTER_ADDR", "empty"),
        ];
        for (vars, arg, reason) in cases {
            let (got_arg, got_reason) = rejection(vars);
            assert_eq!(got_arg, arg, "{vars:?}");
            assert!(got_reason.contains(reason), "{vars:?}: reason {got_reason:?} lacks {reason:?}");
        }
        let (arg, _) = rejection(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "0")]);
        assert_eq!(arg, "LOCAL_WORLD_SIZE");
        let (arg, _) = rejection(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "0")]);
        assert_eq!(arg, "MASTER_PORT");
    }
}
