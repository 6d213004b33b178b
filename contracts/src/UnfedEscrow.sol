// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

interface IUnfedToken {
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
    function burn(uint256 value) external;
}

/// @title UnfedEscrow: node stakes, client balances and settlements of UNFED work.
/// @notice Nodes stake to become eligible (stake >= minStake) and unstake through a
/// cooldown. Clients deposit; the settler posts settlements that pay nodes out of the
/// paying client's balance. The client's balance is debited when the settlement is
/// posted (so it cannot be withdrawn while the settlement is open) and refunded if the
/// settlement is challenged inside the challenge window; after the window anyone may
/// finalize it, crediting the nodes' claimable earnings.
/// A client withdraws in two steps: a request, then after `withdrawDelay` (at least the
/// challenge window; deployments add one settlement interval) the withdrawal itself.
/// Settlements keep drawing on the balance during the delay, so work done before the
/// request is still paid; the withdrawal then pays min(requested, remaining balance).
/// One key per duty: the admin configures and assigns roles, the settler posts and
/// challenges settlements, the slasher slashes; none can do another's job.
contract UnfedEscrow {
    /// Where slashed stake goes.
    uint8 public constant SLASH_TO_BURN = 0;
    /// To the admin (the deployment's treasury).
    uint8 public constant SLASH_TO_ADMIN = 1;
    uint8 public constant SLASH_TO_POOL = 2;
    uint16 public constant BPS = 10000;

    struct Settlement {
        address client;
        uint64 postedAt;
        bool finalized;
        bool challenged;
        uint256 total;
        address[] nodes;
        uint256[] amounts;
    }

    IUnfedToken public immutable token;
    address public admin;
    address public settler;
    address public slasher;
    uint256 public minStake;
    uint256 public cooldown;
    uint256 public challengeWindow;
    uint256 public withdrawDelay;
    uint8 public slashDestination;
    uint16 public slashBps;

    mapping(address => uint256) public stakedBalance;
    mapping(address => uint256) public coolingBalance;
    mapping(address => uint256) public unlockTime;
    mapping(address => uint256) public clientBalance;
    /// A client's pending withdrawal: the amount asked for and when it may execute.
    mapping(address => uint256) public withdrawRequested;
    mapping(address => uint256) public withdrawUnlockTime;
    mapping(address => uint256) public earnings;
    /// Slashed stake kept by the escrow when slashDestination == SLASH_TO_POOL.
    uint256 public slashPool;
    mapping(bytes32 => Settlement) private settlements;

    event Staked(address indexed node, uint256 amount, uint256 totalStake);
    event UnstakeRequested(address indexed node, uint256 amount, uint256 unlockTime);
    event Withdrawn(address indexed node, uint256 amount);
    event Deposited(address indexed payer, address indexed client, uint256 amount);
    event ClientWithdrawRequested(address indexed client, uint256 amount, uint256 unlockTime);
    event ClientWithdrawn(address indexed client, uint256 amount);
    event SettlementPosted(bytes32 indexed settlementHash, address indexed client, uint256 total, uint256 challengeDeadline);
    event SettlementFinalized(bytes32 indexed settlementHash, uint256 total);
    event SettlementChallenged(bytes32 indexed settlementHash, address indexed client, uint256 refunded);
    event EarningsClaimed(address indexed node, uint256 amount);
    event Slashed(address indexed node, uint256 amount, uint256 fromActive, uint256 fromCooling, uint8 destination, string reason);
    event MinStakeUpdated(uint256 minStake);
    event CooldownUpdated(uint256 cooldown);
    event ChallengeWindowUpdated(uint256 challengeWindow);
    event SlashConfigUpdated(uint8 destination, uint16 bps);
    event WithdrawDelayUpdated(uint256 withdrawDelay);
    event AdminTransferred(address indexed previousAdmin, address indexed newAdmin);
    event SettlerUpdated(address indexed settler);
    event SlasherUpdated(address indexed slasher);

    modifier onlyAdmin() {
        require(msg.sender == admin, "UnfedEscrow: caller is not the admin");
        _;
    }

    modifier onlySettler() {
        require(msg.sender == settler, "UnfedEscrow: caller is not the settler");
        _;
    }

    modifier onlySlasher() {
        require(msg.sender == slasher, "UnfedEscrow: caller is not the slasher");
        _;
    }

    constructor(
        address token_,
        uint256 minStake_,
        uint256 cooldown_,
        uint256 challengeWindow_,
        uint256 withdrawDelay_,
        uint8 slashDestination_,
        uint16 slashBps_
    ) {
        require(token_ != address(0), "UnfedEscrow: token is the zero address");
        require(slashDestination_ <= SLASH_TO_POOL, "UnfedEscrow: unknown slash destination");
        require(slashBps_ <= BPS, "UnfedEscrow: slash bps above 10000");
        require(withdrawDelay_ >= challengeWindow_, "UnfedEscrow: withdraw delay below challenge window");
        token = IUnfedToken(token_);
        // The deployer holds every role until it hands settler and slasher to their keys.
        admin = msg.sender;
        settler = msg.sender;
        slasher = msg.sender;
        withdrawDelay = withdrawDelay_;
        minStake = minStake_;
        cooldown = cooldown_;
        challengeWindow = challengeWindow_;
        slashDestination = slashDestination_;
        slashBps = slashBps_;
        emit AdminTransferred(address(0), msg.sender);
        emit SettlerUpdated(msg.sender);
        emit SlasherUpdated(msg.sender);
    }

    // ---- staking ----

    function stake(uint256 amount) external {
        require(amount > 0, "UnfedEscrow: stake amount is zero");
        require(token.transferFrom(msg.sender, address(this), amount), "UnfedEscrow: token transfer failed");
        stakedBalance[msg.sender] += amount;
        emit Staked(msg.sender, amount, stakedBalance[msg.sender]);
    }

    /// Moves `amount` of active stake into cooldown; the cooldown restarts for
    /// everything cooling, so a later request cannot unlock earlier funds sooner.
    function requestUnstake(uint256 amount) external {
        require(amount > 0, "UnfedEscrow: unstake amount is zero");
        require(stakedBalance[msg.sender] >= amount, "UnfedEscrow: unstake amount exceeds stake");
        stakedBalance[msg.sender] -= amount;
        coolingBalance[msg.sender] += amount;
        uint256 unlockAt = block.timestamp + cooldown;
        unlockTime[msg.sender] = unlockAt;
        emit UnstakeRequested(msg.sender, amount, unlockAt);
    }

    function withdraw() external {
        uint256 amount = coolingBalance[msg.sender];
        require(amount > 0, "UnfedEscrow: nothing to withdraw");
        require(block.timestamp >= unlockTime[msg.sender], "UnfedEscrow: cooldown not elapsed");
        coolingBalance[msg.sender] = 0;
        unlockTime[msg.sender] = 0;
        require(token.transfer(msg.sender, amount), "UnfedEscrow: token transfer failed");
        emit Withdrawn(msg.sender, amount);
    }

    function isEligible(address node) external view returns (bool) {
        return stakedBalance[node] >= minStake && stakedBalance[node] > 0;
    }

    // ---- client balances ----

    function deposit(uint256 amount) external {
        _deposit(msg.sender, amount);
    }

    function depositFor(address client, uint256 amount) external {
        require(client != address(0), "UnfedEscrow: client is the zero address");
        _deposit(client, amount);
    }

    /// Starts the withdrawal delay for `amount`; a new request replaces the pending one
    /// and restarts the delay. The balance stays in place (and payable) meanwhile.
    function requestClientWithdraw(uint256 amount) external {
        require(amount > 0, "UnfedEscrow: withdraw amount is zero");
        require(clientBalance[msg.sender] >= amount, "UnfedEscrow: withdraw amount exceeds balance");
        uint256 unlockAt = block.timestamp + withdrawDelay;
        withdrawRequested[msg.sender] = amount;
        withdrawUnlockTime[msg.sender] = unlockAt;
        emit ClientWithdrawRequested(msg.sender, amount, unlockAt);
    }

    /// Executes the pending request once its delay has passed, paying what settlements
    /// left of it: min(requested, current balance).
    function clientWithdraw() external {
        uint256 requested = withdrawRequested[msg.sender];
        require(requested > 0, "UnfedEscrow: no withdrawal requested");
        require(block.timestamp >= withdrawUnlockTime[msg.sender], "UnfedEscrow: withdraw delay not elapsed");
        uint256 balance = clientBalance[msg.sender];
        uint256 amount = requested <= balance ? requested : balance;
        require(amount > 0, "UnfedEscrow: nothing left to withdraw");
        withdrawRequested[msg.sender] = 0;
        withdrawUnlockTime[msg.sender] = 0;
        clientBalance[msg.sender] = balance - amount;
        require(token.transfer(msg.sender, amount), "UnfedEscrow: token transfer failed");
        emit ClientWithdrawn(msg.sender, amount);
    }

    function _deposit(address client, uint256 amount) private {
        require(amount > 0, "UnfedEscrow: deposit amount is zero");
        require(token.transferFrom(msg.sender, address(this), amount), "UnfedEscrow: token transfer failed");
        clientBalance[client] += amount;
        emit Deposited(msg.sender, client, amount);
    }

    // ---- settlements ----

    function postSettlement(bytes32 settlementHash, address client, address[] calldata nodes, uint256[] calldata amounts)
        external
        onlySettler
    {
        require(settlements[settlementHash].postedAt == 0, "UnfedEscrow: settlement already posted");
        require(nodes.length == amounts.length, "UnfedEscrow: nodes and amounts length mismatch");
        require(nodes.length > 0, "UnfedEscrow: settlement has no nodes");
        uint256 total = 0;
        for (uint256 i = 0; i < nodes.length; i++) {
            require(nodes[i] != address(0), "UnfedEscrow: node is the zero address");
            total += amounts[i];
        }
        require(clientBalance[client] >= total, "UnfedEscrow: insufficient client balance");
        clientBalance[client] -= total;
        Settlement storage s = settlements[settlementHash];
        s.client = client;
        s.postedAt = uint64(block.timestamp);
        s.total = total;
        s.nodes = nodes;
        s.amounts = amounts;
        emit SettlementPosted(settlementHash, client, total, block.timestamp + challengeWindow);
    }

    function finalizeSettlement(bytes32 settlementHash) external {
        Settlement storage s = settlements[settlementHash];
        require(s.postedAt != 0, "UnfedEscrow: unknown settlement");
        require(!s.finalized, "UnfedEscrow: settlement already finalized");
        require(!s.challenged, "UnfedEscrow: settlement was challenged");
        require(block.timestamp >= uint256(s.postedAt) + challengeWindow, "UnfedEscrow: challenge window still open");
        s.finalized = true;
        for (uint256 i = 0; i < s.nodes.length; i++) {
            earnings[s.nodes[i]] += s.amounts[i];
        }
        emit SettlementFinalized(settlementHash, s.total);
    }

    function challengeSettlement(bytes32 settlementHash) external onlySettler {
        Settlement storage s = settlements[settlementHash];
        require(s.postedAt != 0, "UnfedEscrow: unknown settlement");
        require(!s.finalized, "UnfedEscrow: settlement already finalized");
        require(!s.challenged, "UnfedEscrow: settlement already challenged");
        require(block.timestamp < uint256(s.postedAt) + challengeWindow, "UnfedEscrow: challenge window closed");
        s.challenged = true;
        clientBalance[s.client] += s.total;
        emit SettlementChallenged(settlementHash, s.client, s.total);
    }

    function getSettlement(bytes32 settlementHash)
        external
        view
        returns (address client, uint64 postedAt, bool finalized, bool challenged, uint256 total, address[] memory nodes, uint256[] memory amounts)
    {
        Settlement storage s = settlements[settlementHash];
        return (s.client, s.postedAt, s.finalized, s.challenged, s.total, s.nodes, s.amounts);
    }

    function claimEarnings() external {
        uint256 amount = earnings[msg.sender];
        require(amount > 0, "UnfedEscrow: no earnings to claim");
        earnings[msg.sender] = 0;
        require(token.transfer(msg.sender, amount), "UnfedEscrow: token transfer failed");
        emit EarningsClaimed(msg.sender, amount);
    }

    // ---- slashing ----

    /// Slashes slashBps of the node's active + cooling stake, taking active stake first
    /// so that a node cannot shelter stake from a slash by requesting an unstake.
    function slashNode(address node, string calldata reason) external onlySlasher returns (uint256 amount) {
        uint256 active = stakedBalance[node];
        uint256 cooling = coolingBalance[node];
        require(active + cooling > 0, "UnfedEscrow: node has no stake");
        amount = ((active + cooling) * slashBps) / BPS;
        require(amount > 0, "UnfedEscrow: slash amount is zero");
        uint256 fromActive = amount <= active ? amount : active;
        uint256 fromCooling = amount - fromActive;
        stakedBalance[node] = active - fromActive;
        coolingBalance[node] = cooling - fromCooling;
        if (slashDestination == SLASH_TO_BURN) {
            token.burn(amount);
        } else if (slashDestination == SLASH_TO_ADMIN) {
            require(token.transfer(admin, amount), "UnfedEscrow: token transfer failed");
        } else {
            slashPool += amount;
        }
        emit Slashed(node, amount, fromActive, fromCooling, slashDestination, reason);
    }

    // ---- admin configuration ----

    function setMinStake(uint256 minStake_) external onlyAdmin {
        minStake = minStake_;
        emit MinStakeUpdated(minStake_);
    }

    function setCooldown(uint256 cooldown_) external onlyAdmin {
        cooldown = cooldown_;
        emit CooldownUpdated(cooldown_);
    }

    function setChallengeWindow(uint256 challengeWindow_) external onlyAdmin {
        require(challengeWindow_ <= withdrawDelay, "UnfedEscrow: challenge window above withdraw delay");
        challengeWindow = challengeWindow_;
        emit ChallengeWindowUpdated(challengeWindow_);
    }

    function setSlashConfig(uint8 destination, uint16 bps) external onlyAdmin {
        require(destination <= SLASH_TO_POOL, "UnfedEscrow: unknown slash destination");
        require(bps <= BPS, "UnfedEscrow: slash bps above 10000");
        slashDestination = destination;
        slashBps = bps;
        emit SlashConfigUpdated(destination, bps);
    }

    /// Must stay >= challengeWindow, else a client could withdraw before an open
    /// settlement's challenge could return the money.
    function setWithdrawDelay(uint256 withdrawDelay_) external onlyAdmin {
        require(withdrawDelay_ >= challengeWindow, "UnfedEscrow: withdraw delay below challenge window");
        withdrawDelay = withdrawDelay_;
        emit WithdrawDelayUpdated(withdrawDelay_);
    }

    function setSettler(address settler_) external onlyAdmin {
        require(settler_ != address(0), "UnfedEscrow: settler is the zero address");
        settler = settler_;
        emit SettlerUpdated(settler_);
    }

    function setSlasher(address slasher_) external onlyAdmin {
        require(slasher_ != address(0), "UnfedEscrow: slasher is the zero address");
        slasher = slasher_;
        emit SlasherUpdated(slasher_);
    }

    function transferAdmin(address newAdmin) external onlyAdmin {
        require(newAdmin != address(0), "UnfedEscrow: new admin is the zero address");
        emit AdminTransferred(admin, newAdmin);
        admin = newAdmin;
    }
}
