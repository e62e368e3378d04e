// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";

/// @dev What Disputes needs from Staking: stake-weighted votes at a past timepoint (OZ Votes),
///      the current active stake (fallback while Staking has no checkpoints) and `slash`.
interface IStakingVotes {
    function getPastVotes(address account, uint256 timepoint) external view returns (uint256);
    function getPastTotalSupply(uint256 timepoint) external view returns (uint256);
    function clock() external view returns (uint48);
    function activeStake(address account) external view returns (uint256);
    function slash(address account, uint256 amount, string calldata reason) external returns (uint256);
    function freeze(address account, uint64 until) external;
    function delegationOf(address account) external view returns (address delegatee, uint64 changedAt);
}

/// @title Worker disputes judged by staker jurors
/// @notice A worker whose result was refused by verification (a refusal the coordinator signed:
///         case id, worker, evidence bundle hash, time) or whose stake a slasher proposed to take
///         may open a dispute within `disputeWindow` by posting a SOGNI `bond`. The coordinator
///         then publishes the evidence bundle with extra re-checks (its hash opens the vote; if it
///         does not within `evidenceWindow`, anyone, the worker first of all, opens it on the
///         original evidence until `voteBy`). A dispute whose vote nobody opened by `voteBy` is
///         lost: `resolve` then upholds the refusal or slash and the bond goes to the treasury,
///         so disputing and waiting never keeps a slashed stake. Stakers vote stake-weighted
///         (votes one second before the dispute opened: the jury, and the worker's delegate who
///         may not sit on it, are fixed then), commit-reveal so votes cannot be copied.
///         One juror's weight is capped at `jurorCapBps` of all votes at the snapshot, so a
///         single large staker cannot decide a case alone against the others.
///         The worker wins only with a strict majority of revealed weight: bond back and an event
///         the coordinator acts on (pay re-credited, reputation restored). Otherwise the refusal
///         or slash stands, the bond is kept: `jurorShareBps` of it goes to the majority jurors
///         who revealed (pro rata to weight, claimed), the rest to the treasury.
/// @dev Holds SLASHER_ROLE on Staking: a slash is proposed here and executes only after its
///      dispute window closed with no dispute, or after the worker lost the dispute.
///      Roles: DEFAULT_ADMIN_ROLE (governance: windows, bond, shares, treasury, roles);
///      REPORTER_ROLE (coordinator keys: sign refusals, publish evidence bundles);
///      SLASHER_ROLE (settlement key: propose slashes).
contract Disputes is AccessControlDefaultAdminRules {
    using SafeERC20 for IERC20;

    bytes32 public constant REPORTER_ROLE = keccak256("REPORTER_ROLE");
    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    uint256 public constant MAX_BPS = 10_000;
    /// @notice Beyond a case's last window, how long a proposed slash keeps the worker's stake
    ///         frozen (`Staking.freeze`) for anyone to execute it.
    uint64 public constant EXECUTE_GRACE = 7 days;

    enum Kind {
        None,
        Refusal,
        Slash
    }

    enum State {
        None,
        Proposed, // a slash in its dispute window, not disputed
        Disputed, // bond posted, waiting for the evidence bundle with the re-checks
        Voting, // commit, then reveal
        WorkerWon,
        WorkerLost,
        Executed // a slash taken (after the window, or after a lost dispute)
    }

    struct Case {
        address worker;
        Kind kind;
        State state;
        uint64 windowEnd;
        uint64 evidenceDeadline;
        uint64 commitEnd;
        uint64 revealEnd;
        uint64 voteBy; // the vote must be open by then, or `resolve` upholds the case
        uint256 snapshot; // votes one second before the dispute opened
        bytes32 evidenceHash;
        bytes32 bundleHash;
        uint256 bond;
        uint256 amount;
        uint256 forWorker;
        uint256 againstWorker;
        uint256 rewardPool;
        address workerDelegate; // whom the worker's stake voted through at the snapshot
        uint64 executeBy; // a slash: executable before this, never after (the freeze's end)
    }

    struct Ballot {
        bytes32 commitment;
        uint256 weight;
        bool revealed;
        bool forWorker;
        bool claimed;
    }

    IERC20 public immutable token;
    IStakingVotes public immutable staking;
    address public treasury;
    uint256 public bond;
    uint64 public disputeWindow;
    uint64 public evidenceWindow;
    uint64 public commitWindow;
    uint64 public revealWindow;
    uint16 public jurorShareBps;
    /// @notice Most weight one juror carries, in bps of all votes (total active stake) at the
    ///         case's snapshot; governed (`setJurorCap`).
    uint16 public jurorCapBps = 1_000;
    uint256 public slashCount;

    mapping(bytes32 caseId => Case) private _cases;
    mapping(bytes32 caseId => string) public slashReason;
    mapping(bytes32 caseId => mapping(address juror => Ballot)) private _ballots;

    event SlashProposed(bytes32 indexed caseId, address indexed worker, uint256 amount, bytes32 evidenceHash, uint64 windowEnd, string reason);
    event DisputeOpened(bytes32 indexed caseId, address indexed worker, Kind kind, bytes32 evidenceHash, uint256 bond, uint64 evidenceDeadline);
    event VotingOpened(bytes32 indexed caseId, bytes32 bundleHash, string bundleUri, uint256 snapshot, uint64 commitEnd, uint64 revealEnd);
    event VoteCommitted(bytes32 indexed caseId, address indexed juror, uint256 weight);
    event VoteRevealed(bytes32 indexed caseId, address indexed juror, bool forWorker, uint256 weight);
    event DisputeResolved(bytes32 indexed caseId, address indexed worker, Kind kind, bool workerWon, uint256 forWorker, uint256 againstWorker, uint256 rewardPool, uint256 toTreasury);
    event RewardClaimed(bytes32 indexed caseId, address indexed juror, uint256 amount);
    event SlashExecuted(bytes32 indexed caseId, address indexed worker, uint256 slashed);
    event ParametersSet(uint256 bond, uint64 disputeWindow, uint64 evidenceWindow, uint64 commitWindow, uint64 revealWindow, uint16 jurorShareBps);
    event TreasurySet(address treasury);
    event JurorCapSet(uint16 jurorCapBps);

    error ZeroAddress();
    error ZeroAmount();
    error BadParameters();
    error UnknownCase(bytes32 caseId);
    error CaseExists(bytes32 caseId);
    error NotReporter(address signer);
    error NotYourCase(address caller, address worker);
    error WindowClosed(uint64 windowEnd);
    error WindowOpen(uint64 windowEnd);
    error SlashExpired(uint64 executeBy);
    error WrongState(State state);
    error EvidencePending(uint64 evidenceDeadline);
    error CommitClosed(uint64 commitEnd);
    error NotRevealTime(uint64 commitEnd, uint64 revealEnd);
    error VotingNotOver(uint64 revealEnd);
    error NotAStaker(address juror, uint256 snapshot);
    error WorkerCannotVote();
    error AlreadyCommitted(address juror);
    error NothingToReveal(address juror);
    error BadReveal(address juror);
    error NoReward(address juror);
    error DelegationJustChanged(address worker, uint64 changedAt);
    error VotePending(uint64 voteBy);
    error VoteDeadlinePassed(uint64 voteBy);

    constructor(
        IERC20 token_,
        IStakingVotes staking_,
        address governance,
        address treasury_,
        uint48 adminTransferDelay,
        uint256 bond_,
        uint64[4] memory windows,
        uint16 jurorShareBps_
    ) AccessControlDefaultAdminRules(adminTransferDelay, governance) {
        if (address(token_) == address(0) || address(staking_) == address(0) || treasury_ == address(0)) {
            revert ZeroAddress();
        }
        token = token_;
        staking = staking_;
        treasury = treasury_;
        _setParameters(bond_, windows[0], windows[1], windows[2], windows[3], jurorShareBps_);
    }

    // ----- governance -----

    function setParameters(
        uint256 bond_,
        uint64 disputeWindow_,
        uint64 evidenceWindow_,
        uint64 commitWindow_,
        uint64 revealWindow_,
        uint16 jurorShareBps_
    ) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setParameters(bond_, disputeWindow_, evidenceWindow_, commitWindow_, revealWindow_, jurorShareBps_);
    }

    /// @notice Cap one juror's weight at `bps` of all votes at a case's snapshot (10_000: no cap).
    function setJurorCap(uint16 bps) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (bps == 0 || bps > MAX_BPS) revert BadParameters();
        jurorCapBps = bps;
        emit JurorCapSet(bps);
    }

    function setTreasury(address treasury_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (treasury_ == address(0)) revert ZeroAddress();
        treasury = treasury_;
        emit TreasurySet(treasury_);
    }

    function _setParameters(uint256 b, uint64 d, uint64 e, uint64 c, uint64 r, uint16 share) private {
        if (b == 0 || d == 0 || c == 0 || r == 0 || share > MAX_BPS) revert BadParameters();
        bond = b;
        disputeWindow = d;
        evidenceWindow = e;
        commitWindow = c;
        revealWindow = r;
        jurorShareBps = share;
        emit ParametersSet(b, d, e, c, r, share);
    }

    // ----- slashes -----

    /// @notice Propose taking `amount` of `worker`'s stake; it executes after the dispute window.
    function proposeSlash(address worker, uint256 amount, string calldata reason, bytes32 evidenceHash)
        external
        onlyRole(SLASHER_ROLE)
        returns (bytes32 caseId)
    {
        if (worker == address(0)) revert ZeroAddress();
        if (amount == 0) revert ZeroAmount();
        caseId = keccak256(abi.encode("sogni-slash", block.chainid, address(this), ++slashCount));
        Case storage c = _cases[caseId];
        c.worker = worker;
        c.kind = Kind.Slash;
        c.state = State.Proposed;
        c.windowEnd = uint64(block.timestamp) + disputeWindow;
        c.evidenceHash = evidenceHash;
        c.amount = amount;
        slashReason[caseId] = reason;
        emit SlashProposed(caseId, worker, amount, evidenceHash, c.windowEnd, reason);
        // the worker cannot withdraw before the case can be decided and executed: the dispute
        // window, a dispute's evidence, commit and reveal windows, and time to execute
        c.executeBy = c.windowEnd + evidenceWindow + commitWindow + revealWindow + EXECUTE_GRACE;
        staking.freeze(worker, c.executeBy);
    }

    /// @notice Take the proposed stake: after the window closed undisputed, or after a lost
    ///         dispute. Anyone may send it (the slasher decided; the window protected the worker),
    ///         but only within `EXECUTE_GRACE` of the case's end: an old case left unexecuted
    ///         never takes stake the worker put up later (after its freeze ran out).
    function executeSlash(bytes32 caseId) external returns (uint256 slashed) {
        Case storage c = _known(caseId);
        if (c.kind != Kind.Slash) revert WrongState(c.state);
        uint64 deadline = c.executeBy;
        if (c.state == State.Proposed) {
            if (block.timestamp < c.windowEnd) revert WindowOpen(c.windowEnd);
        } else if (c.state == State.WorkerLost) {
            // a vote opened late (anyone may open it after the evidence deadline) ends late
            uint64 afterVote = c.revealEnd + EXECUTE_GRACE;
            if (afterVote > deadline) deadline = afterVote;
        } else {
            revert WrongState(c.state);
        }
        if (block.timestamp >= deadline) revert SlashExpired(deadline);
        c.state = State.Executed;
        slashed = staking.slash(c.worker, c.amount, slashReason[caseId]);
        emit SlashExecuted(caseId, c.worker, slashed);
    }

    // ----- opening a dispute -----

    /// @notice The digest a reporter (coordinator key) signs (EIP-191) to refuse a result.
    function refusalDigest(bytes32 caseId, address worker, bytes32 evidenceHash, uint64 refusedAt)
        public
        view
        returns (bytes32)
    {
        return keccak256(
            abi.encode("sogni-refusal-v1", block.chainid, address(this), caseId, worker, evidenceHash, refusedAt)
        );
    }

    /// @notice Dispute a signed refusal (the worker sends it, with the bond approved).
    function disputeRefusal(
        bytes32 caseId,
        address worker,
        bytes32 evidenceHash,
        uint64 refusedAt,
        bytes calldata signature
    ) external {
        if (_cases[caseId].kind != Kind.None) revert CaseExists(caseId);
        address signer = ECDSA.recover(
            MessageHashUtils.toEthSignedMessageHash(refusalDigest(caseId, worker, evidenceHash, refusedAt)), signature
        );
        if (!hasRole(REPORTER_ROLE, signer)) revert NotReporter(signer);
        if (refusedAt > block.timestamp) revert BadParameters();
        Case storage c = _cases[caseId];
        c.worker = worker;
        c.kind = Kind.Refusal;
        c.windowEnd = refusedAt + disputeWindow;
        c.evidenceHash = evidenceHash;
        _open(caseId, c);
    }

    /// @notice Dispute a proposed slash (the worker sends it, with the bond approved).
    function disputeSlash(bytes32 caseId) external {
        Case storage c = _known(caseId);
        if (c.state != State.Proposed) revert WrongState(c.state);
        _open(caseId, c);
    }

    /// @dev The jury is fixed here, not when the vote opens: the votes one second before, and
    ///      the account the worker's stake voted through then (barred from judging). Votes of
    ///      the current second can still move, so a dispute in the second the worker's
    ///      delegation changed is refused: the delegate read now might not be the one holding
    ///      its stake at the snapshot. The vote must open by `voteBy`: the evidence deadline
    ///      plus one commit window (the worker's own time to open it on the original evidence).
    function _open(bytes32 caseId, Case storage c) private {
        if (msg.sender != c.worker) revert NotYourCase(msg.sender, c.worker);
        if (block.timestamp >= c.windowEnd) revert WindowClosed(c.windowEnd);
        (address delegatee, uint64 changedAt) = staking.delegationOf(msg.sender);
        uint256 now_ = _clock();
        if (changedAt >= now_) revert DelegationJustChanged(msg.sender, changedAt);
        c.snapshot = now_ - 1;
        c.workerDelegate = delegatee; // its stake must not judge its case
        c.state = State.Disputed;
        c.bond = bond;
        uint64 evidenceDeadline = uint64(block.timestamp) + evidenceWindow;
        uint64 voteBy = evidenceDeadline + commitWindow;
        (c.evidenceDeadline, c.voteBy) = (evidenceDeadline, voteBy);
        if (c.kind == Kind.Slash) {
            // a case lost by default (no vote by `voteBy`) must still be executable: the
            // freeze covers it (windows governance lengthened since the proposal included)
            uint64 until = voteBy + EXECUTE_GRACE;
            if (until > c.executeBy) {
                c.executeBy = until;
                staking.freeze(c.worker, until);
            }
        }
        emit DisputeOpened(caseId, c.worker, c.kind, c.evidenceHash, c.bond, c.evidenceDeadline);
        token.safeTransferFrom(msg.sender, address(this), c.bond);
    }

    // ----- voting -----

    /// @notice Open the vote on the bundle with the re-checks: a reporter at any time once
    ///         disputed, anyone (the worker above all: a stalled vote) after `evidenceDeadline`
    ///         (then on the original evidence); nobody after `voteBy` (`resolve` upholds it).
    ///         The jury was fixed when the dispute opened (`snapshot`, `workerDelegate`).
    function openVoting(bytes32 caseId, bytes32 bundleHash, string calldata bundleUri) external {
        Case storage c = _known(caseId);
        if (c.state != State.Disputed) revert WrongState(c.state);
        if (block.timestamp >= c.voteBy) revert VoteDeadlinePassed(c.voteBy);
        if (!hasRole(REPORTER_ROLE, msg.sender)) {
            if (block.timestamp < c.evidenceDeadline) revert EvidencePending(c.evidenceDeadline);
            bundleHash = c.evidenceHash;
        }
        c.state = State.Voting;
        c.bundleHash = bundleHash;
        c.commitEnd = uint64(block.timestamp) + commitWindow;
        c.revealEnd = c.commitEnd + revealWindow;
        emit VotingOpened(caseId, bundleHash, bundleUri, c.snapshot, c.commitEnd, c.revealEnd);
        // a slash whose vote opens late can still be executed after it (`executeSlash`): the
        // worker's stake stays frozen that long, or it could leave and come back to pay for it
        if (c.kind == Kind.Slash) staking.freeze(c.worker, c.revealEnd + EXECUTE_GRACE);
    }

    /// @notice The commitment a juror sends: keccak256(abi.encode(forWorker, salt, juror, caseId, this)).
    function commitmentOf(bytes32 caseId, bool forWorker, bytes32 salt, address juror)
        public
        view
        returns (bytes32)
    {
        return keccak256(abi.encode(forWorker, salt, juror, caseId, address(this)));
    }

    function commitVote(bytes32 caseId, bytes32 commitment) external {
        Case storage c = _known(caseId);
        if (c.state != State.Voting) revert WrongState(c.state);
        if (block.timestamp >= c.commitEnd) revert CommitClosed(c.commitEnd);
        if (msg.sender == c.worker || msg.sender == c.workerDelegate) revert WorkerCannotVote();
        Ballot storage b = _ballots[caseId][msg.sender];
        if (b.commitment != bytes32(0)) revert AlreadyCommitted(msg.sender);
        uint256 weight = jurorWeight(msg.sender, c.snapshot);
        if (weight == 0) revert NotAStaker(msg.sender, c.snapshot);
        b.commitment = commitment;
        b.weight = weight;
        emit VoteCommitted(caseId, msg.sender, weight);
    }

    function revealVote(bytes32 caseId, bool forWorker, bytes32 salt) external {
        Case storage c = _known(caseId);
        if (c.state != State.Voting) revert WrongState(c.state);
        if (block.timestamp < c.commitEnd || block.timestamp >= c.revealEnd) {
            revert NotRevealTime(c.commitEnd, c.revealEnd);
        }
        Ballot storage b = _ballots[caseId][msg.sender];
        if (b.commitment == bytes32(0) || b.revealed) revert NothingToReveal(msg.sender);
        if (commitmentOf(caseId, forWorker, salt, msg.sender) != b.commitment) revert BadReveal(msg.sender);
        b.revealed = true;
        b.forWorker = forWorker;
        if (forWorker) c.forWorker += b.weight;
        else c.againstWorker += b.weight;
        emit VoteRevealed(caseId, msg.sender, forWorker, b.weight);
    }

    /// @notice Settle a vote once the reveal window closed, or a dispute whose vote nobody
    ///         opened by `voteBy` (lost: the refusal or slash stands, the bond goes to the
    ///         treasury). Anyone may call.
    function resolve(bytes32 caseId) external {
        Case storage c = _known(caseId);
        if (c.state == State.Disputed) {
            if (block.timestamp < c.voteBy) revert VotePending(c.voteBy);
        } else {
            if (c.state != State.Voting) revert WrongState(c.state);
            if (block.timestamp < c.revealEnd) revert VotingNotOver(c.revealEnd);
        }
        bool won = c.forWorker > c.againstWorker;
        uint256 toTreasury;
        if (won) {
            c.state = State.WorkerWon;
        } else {
            c.state = State.WorkerLost;
            if (c.againstWorker > 0) c.rewardPool = c.bond * jurorShareBps / MAX_BPS;
            toTreasury = c.bond - c.rewardPool;
        }
        emit DisputeResolved(caseId, c.worker, c.kind, won, c.forWorker, c.againstWorker, c.rewardPool, toTreasury);
        if (won) token.safeTransfer(c.worker, c.bond);
        else if (toTreasury > 0) token.safeTransfer(treasury, toTreasury);
    }

    /// @notice A majority juror's share of a kept bond, pro rata to its revealed weight.
    function claimReward(bytes32 caseId) external returns (uint256 amount) {
        amount = rewardOf(caseId, msg.sender);
        if (amount == 0) revert NoReward(msg.sender);
        _ballots[caseId][msg.sender].claimed = true;
        emit RewardClaimed(caseId, msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // ----- views -----

    function rewardOf(bytes32 caseId, address juror) public view returns (uint256) {
        Case storage c = _cases[caseId];
        Ballot storage b = _ballots[caseId][juror];
        if (c.state != State.WorkerLost && !(c.state == State.Executed && c.againstWorker > 0)) return 0;
        if (!b.revealed || b.forWorker || b.claimed || c.againstWorker == 0) return 0;
        return c.rewardPool * b.weight / c.againstWorker;
    }

    /// @notice Stake-weighted votes at `timepoint` (Staking's checkpoints); while Staking has no
    ///         checkpoints, its current active stake.
    function votingWeight(address juror, uint256 timepoint) public view returns (uint256) {
        try staking.getPastVotes(juror, timepoint) returns (uint256 votes) {
            return votes;
        } catch {
            return staking.activeStake(juror);
        }
    }

    /// @notice A juror's weight on a case with snapshot `timepoint`: its votes, capped at
    ///         `jurorCapBps` of all votes then (rounded up, so a capped juror never weighs 0).
    function jurorWeight(address juror, uint256 timepoint) public view returns (uint256 weight) {
        weight = votingWeight(juror, timepoint);
        uint256 cap = jurorCapAt(timepoint);
        if (cap != 0 && weight > cap) weight = cap;
    }

    /// @notice The cap at `timepoint` (0: none, while Staking has no vote checkpoints).
    function jurorCapAt(uint256 timepoint) public view returns (uint256) {
        try staking.getPastTotalSupply(timepoint) returns (uint256 total) {
            return (total * jurorCapBps + MAX_BPS - 1) / MAX_BPS;
        } catch {
            return 0;
        }
    }

    function caseOf(bytes32 caseId) external view returns (Case memory) {
        return _cases[caseId];
    }

    function ballotOf(bytes32 caseId, address juror) external view returns (Ballot memory) {
        return _ballots[caseId][juror];
    }

    function _known(bytes32 caseId) private view returns (Case storage c) {
        c = _cases[caseId];
        if (c.kind == Kind.None) revert UnknownCase(caseId);
    }

    function _clock() private view returns (uint256) {
        try staking.clock() returns (uint48 t) {
            return t;
        } catch {
            return block.number;
        }
    }
}
